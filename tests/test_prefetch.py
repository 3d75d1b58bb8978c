"""Issue 24, item 2: prefetch learned from live traffic.

The learner (``policy.Successors``) counts first-order transitions between the models of
the request stream; with ``prefetch.enabled`` the manager loads the likely next model in
the background (``load(background=True)``): only into free memory, never evicting or
parking anything.  Every guess the manager acts on ends in one ``Prefetched`` event, in
the order the guesses were made, so a test can wait for it instead of for time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from conftest import make_manager
from hypothesis import given, settings
from hypothesis import strategies as st

from modelmora import ModelManager
from modelmora import events as ev
from modelmora.config import ManagerConfig
from modelmora.core.policy import Successors
from modelmora.errors import ConfigError
from modelmora.providers.simulated import SimulatedProvider

NAMES = "abcd"

# -- the learner --------------------------------------------------------------------------------


def followers(trace: list[str], name: str, window: int) -> list[str]:
    """The models requested right after ``name``, its last ``window`` times: by hand."""
    return [trace[i + 1] for i in range(len(trace) - 1) if trace[i] == name][-window:]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(NAMES), max_size=80), st.integers(1, 12))
def test_the_learner_counts_the_last_window_transitions_of_each_model(trace: list[str], window: int) -> None:
    learned = Successors(window)
    for name in trace:
        learned.request(name)
    for a in NAMES:
        after = followers(trace, a, window)
        assert learned.observations(a) == len(after)
        for b in NAMES:
            assert learned.probability(a, b) == (after.count(b) / len(after) if after else 0.0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(NAMES), max_size=80),
    st.integers(1, 12),
    st.floats(0.01, 1.0),
    st.integers(1, 10),
)
def test_a_guess_is_the_likeliest_follower_and_only_over_both_thresholds(
    trace: list[str], window: int, min_probability: float, min_observations: int
) -> None:
    learned = Successors(window)
    for name in trace:
        learned.request(name)
    for a in NAMES:
        after = followers(trace, a, window)
        best = max(after.count(b) / len(after) for b in NAMES) if after else 0.0
        guess = learned.likely(a, min_probability, min_observations)
        if len(after) < min_observations or best < min_probability:
            assert guess is None
        else:
            assert guess is not None
            name, p = guess
            assert p == best == after.count(name) / len(after)


def test_the_learner_refuses_a_window_below_one() -> None:
    with pytest.raises(ValueError, match="window"):
        Successors(0)


# -- the manager ----------------------------------------------------------------------------------

FOUR = {n: {"memory": "4GB"} for n in "abc"}
PREFETCH = {"enabled": True, "min_probability": 0.6, "min_observations": 3}


def record(mm: ModelManager) -> list[ev.Event]:
    seen: list[ev.Event] = []
    mm.events.subscribe(seen.append, leases=False)
    return seen


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for ``condition``; the bound only keeps a broken run from hanging."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def requests(mm: ModelManager, names: str) -> None:
    for name in names:
        async with mm.use(name):
            pass


def prefetched(seen: list[ev.Event]) -> list[Any]:
    return [e for e in seen if isinstance(e, ev.Prefetched)]


@pytest.mark.anyio
async def test_the_likely_next_model_is_loaded_before_it_is_asked_for(sim: SimulatedProvider) -> None:
    async with make_manager(sim, FOUR, prefetch=PREFETCH) as mm:
        await requests(mm, "ababab")  # a → b three times
        await mm.unload("b")
        seen = record(mm)
        async with mm.use("a"):
            await until(lambda: bool(prefetched(seen)))
        assert mm.is_loaded("b")
        [event] = prefetched(seen)
        assert (event.model, event.after, event.probability, event.outcome) == ("b", "a", 1.0, "loaded")
        loads = [e.model for e in seen if isinstance(e, ev.Loading)]
        assert loads == ["b"]


@pytest.mark.anyio
async def test_a_prefetch_never_evicts_anything(sim: SimulatedProvider) -> None:
    models = {n: {"memory": "8GB"} for n in "abc"}  # room for two of the three
    async with make_manager(sim, models, prefetch=PREFETCH) as mm:
        await requests(mm, "ababab")
        await mm.unload("b")
        await mm.load("c")  # a and c fill the budget; b would need an eviction
        seen = record(mm)
        async with mm.use("a"):
            await until(lambda: bool(prefetched(seen)))
        [event] = prefetched(seen)
        assert event.model == "b" and "would evict" in event.outcome
        assert mm.is_loaded("a") and mm.is_loaded("c") and not mm.is_loaded("b")
        assert not [e for e in seen if isinstance(e, ev.Evicted | ev.Slept | ev.Loading)]


@pytest.mark.anyio
async def test_nothing_is_prefetched_below_the_thresholds(sim: SimulatedProvider) -> None:
    models = {n: {"memory": "2GB"} for n in "abcxy"}
    config = {**PREFETCH, "min_observations": 4}
    async with make_manager(sim, models, prefetch=config) as mm:
        # a → b three times (below 4 observations); c → b, c → x twice each (0.5, below
        # 0.6); x → y most times: the one guess below the manager acts on
        await requests(mm, "ababab" + "cbcxcbcx" + "yxyxyxyxy")
        for name in "abcy":
            await mm.unload(name)
        seen = record(mm)
        await requests(mm, "acx")  # guesses are acted on in order: x's event comes last
        await until(lambda: any(e.model == "y" for e in prefetched(seen)))
        assert [(e.model, e.after) for e in prefetched(seen)] == [("y", "x")]
        assert not mm.is_loaded("b")


@pytest.mark.anyio
async def test_prefetch_is_off_by_default_and_its_loads_are_not_requests(sim: SimulatedProvider) -> None:
    assert not ManagerConfig().prefetch.enabled
    async with make_manager(sim, FOUR, prefetch=PREFETCH) as mm:
        await requests(mm, "ababab")
        await mm.unload("b")
        seen = record(mm)
        counted = mm._core.reuse.requests
        async with mm.use("a"):
            await until(lambda: bool(prefetched(seen)))
        assert mm._core.reuse.requests == counted + 1  # a's request; b's background lease is none


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"min_probability": 0}, "min_probability"),
        ({"min_probability": 1.5}, "min_probability"),
        ({"min_observations": 0}, "min_observations"),
        ({"enable": True}, "enable"),
    ],
)
def test_bad_prefetch_settings_get_one_clear_line(bad: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ManagerConfig.from_dict({"prefetch": bad})
