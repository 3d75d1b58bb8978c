"""The memory watchdog (issue 23, item 6): memory that grows after the load, or that other
processes take.  The watchdog's step is called directly (no sleeps, no timing): another
process allocates on a measured GPU (``faulty.external``), or a model measures more than its
estimate (``faulty.measure``), and the step evicts idle models, cheapest first, until the
reading is back under the budget — never a leased or pinned model without ``force``."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelmora import ModelManager
from modelmora import events as ev
from modelmora.core.watchdog import Row, Watchdog, pick
from modelmora.testing.faulty import FaultyProvider, gb

from .support import GB, Events, faulty_manager, hold, model, release_all

pytestmark = pytest.mark.anyio

CARD = {"cuda:0": gb(24)}  # a measured 24 GB card; the budget is 16 GB


def manager(faulty: FaultyProvider, models: dict[str, Any], **watchdog: Any) -> ModelManager:
    return faulty_manager(
        faulty, models, probe=faulty.probe, watchdog={"interval": 3600, "red_line": "5%", **watchdog}
    )


def dog(mm: ModelManager) -> Watchdog:
    return mm._watchdog


def resident(mm: ModelManager) -> set[str]:
    return {e.name for e in mm._core.table if e.state.value in ("ready", "sleeping")}


async def test_another_process_taking_memory_evicts_idle_models_until_under_the_budget() -> None:
    faulty = FaultyProvider(devices=CARD)
    faulty.measure("cheap", {"cuda:0": gb(2)})
    models = {"cheap": model(2), "big": model(4), "busy": model(4), "mid": model(3)}
    async with manager(faulty, models) as mm:
        events = Events(mm)
        for name in ("cheap", "big", "mid", "busy"):
            await mm.load(name)
        async with anyio.create_task_group() as tg:
            busy = hold(tg, mm, "busy")
            await busy.granted.wait()
            faulty.external["cuda:0"] = gb(6)  # 13 GB ours + 6 GB others' = 19 GB > 16.8 GB red line
            await dog(mm).step()
            left = resident(mm)
            await release_all(busy)
    # cheapest first (2 GB, then 3 GB): 19 → 17 → 14 GB ≤ 16 GB; the 4 GB idle one stays
    assert left == {"big", "busy"}, left
    evicted = [e for e in events.of(ev.MemoryPressure) if e.action == "evict"]
    assert [e.model for e in evicted] == ["cheap", "mid"]
    first = evicted[0]
    assert (first.device, first.level, first.used, first.budget) == ("cuda:0", "red", gb(19), gb(16))
    assert first.red_line == int(gb(16) * 1.05) and first.total == gb(24) and first.free == gb(5)
    assert evicted[1].used == gb(17)  # the re-read after the first eviction caused the second
    assert not any(e.action == "force" for e in events.of(ev.MemoryPressure))


async def test_it_stops_at_the_budget_not_the_red_line() -> None:
    faulty = FaultyProvider(devices=CARD)
    models = {"a": model(1), "b": model(1), "c": model(1), "d": model(10)}
    async with manager(faulty, models, red_line="10%", hard_line="50%") as mm:
        for name in ("a", "b", "c", "d"):
            await mm.load(name)  # 13 GB
        faulty.external["cuda:0"] = gb(5)  # 18 GB > 17.6 GB red line
        await dog(mm).step()
        left = resident(mm)
    # 18 → 17 (under the red line, still over the budget) → 16 GB: two go, not one
    assert left == {"c", "d"}, left


async def test_below_the_red_line_nothing_happens() -> None:
    faulty = FaultyProvider(devices=CARD)
    async with manager(faulty, {"a": model(4), "b": model(4)}) as mm:
        events = Events(mm)
        await mm.load("a")
        await mm.load("b")
        faulty.external["cuda:0"] = gb(8) + gb(0.5)  # 16.5 GB: over the budget, under the red line
        await dog(mm).step()
        left = resident(mm)
    assert left == {"a", "b"}
    assert not events.of(ev.MemoryPressure)


async def test_past_the_hard_line_without_force_it_raises_the_alarm_and_keeps_leased_models() -> None:
    faulty = FaultyProvider(devices=CARD)
    async with manager(faulty, {"a": model(8), "b": model(2)}) as mm:
        events = Events(mm)
        await mm.load("b")
        async with anyio.create_task_group() as tg:
            a = hold(tg, mm, "a")
            await a.granted.wait()
            faulty.external["cuda:0"] = gb(10)  # 20 GB > 18.4 GB hard line
            await dog(mm).step()
            left = resident(mm)
            still_held = not a.handle.closed if a.handle else False
            await dog(mm).step()  # the same episode: no second alarm
            await release_all(a)
    assert left == {"a"} and still_held
    pressure = events.of(ev.MemoryPressure)
    alarms = [e for e in pressure if e.action == "alarm"]
    assert len(alarms) == 1 and alarms[0].level == "hard" and alarms[0].used == gb(20)
    assert alarms[0].hard_line == int(gb(16) * 1.15)
    assert [e.model for e in pressure if e.action == "evict"] == ["b"]
    assert len([e for e in pressure if e.action == "stuck"]) == 1
    assert not any(e.action == "force" for e in pressure)
    assert not any(u.forced for u in events.of(ev.Unloading))


async def test_past_the_hard_line_with_force_leased_models_are_forced_out() -> None:
    faulty = FaultyProvider(devices=CARD)
    async with manager(faulty, {"a": model(8), "b": model(3)}, force=True) as mm:
        events = Events(mm)
        async with anyio.create_task_group() as tg:
            a, b = hold(tg, mm, "a"), hold(tg, mm, "b")
            await a.granted.wait()
            await b.granted.wait()
            faulty.external["cuda:0"] = gb(8)  # 19 GB > 18.4 GB hard line
            await dog(mm).step()
            left = resident(mm)
            await release_all(a, b)
    # b is the cheaper to lose (3 GB): forcing it brings 19 → 16 GB, under the hard line
    assert left == {"a"}, left
    forced = [e for e in events.of(ev.MemoryPressure) if e.action == "force"]
    assert [e.model for e in forced] == ["b"] and forced[0].used == gb(19)
    assert [u.model for u in events.of(ev.Unloading) if u.forced] == ["b"]


async def test_pinned_models_are_kept() -> None:
    faulty = FaultyProvider(devices=CARD)
    async with manager(faulty, {"p": model(8, pinned=True), "q": model(2)}, force=True) as mm:
        await mm.load("p")
        await mm.load("q")
        faulty.external["cuda:0"] = gb(10)
        await dog(mm).step()
        left = resident(mm)
    assert left == {"p"}


async def test_a_failing_read_is_a_problem_and_the_next_step_still_runs() -> None:
    faulty = FaultyProvider(devices=CARD)
    async with manager(faulty, {"a": model(2)}) as mm:
        await mm.load("a")
        wd = dog(mm)
        real = faulty.probe.read

        def broken() -> Any:
            raise RuntimeError("driver went away")

        faulty.probe.read = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await wd.step()  # run() reports it as the "watchdog" problem and goes on
        faulty.probe.read = real  # type: ignore[method-assign]
        faulty.external["cuda:0"] = gb(16)
        await wd.step()
        left = resident(mm)
    assert left == set()


# -- the choice, as a property ------------------------------------------------------------------


rows = st.lists(
    st.builds(
        Row,
        name=st.text("abcdefgh", min_size=1, max_size=3),
        bytes=st.integers(0, 8).map(lambda n: n * GB),
        leases=st.integers(0, 2),
        pinned=st.booleans(),
        settled=st.booleans(),
        owned=st.booleans(),
        cost=st.floats(0, 100),
        last_used=st.floats(0, 100),
    ),
    max_size=8,
    unique_by=lambda r: r.name,
)


@settings(max_examples=200, deadline=None)
@given(rows, st.integers(0, 40), st.integers(1, 20))
def test_the_watchdogs_choice_never_takes_a_leased_or_pinned_model_and_stops_at_the_budget(
    table: list[Row], others_gb: int, budget_gb: int
) -> None:
    """Drive the step's loop with a simulated reading: used = others + what the rows hold."""
    budget = budget_gb * GB
    remaining = list(table)
    used = others_gb * GB + sum(r.bytes for r in remaining)
    red = int(budget * 1.05)
    evicted: list[Row] = []
    if used > red:
        while used > budget:
            victim = pick(remaining)
            if victim is None:
                break
            evicted.append(victim)
            remaining.remove(victim)
            used -= victim.bytes
    for r in evicted:
        assert r.leases == 0 and not r.pinned and r.settled and r.owned and r.bytes > 0
    # it stops as soon as used ≤ budget: without its last victim it was still over
    if evicted:
        assert used + evicted[-1].bytes > budget
    # and it stops early only when nothing idle is left
    if used > budget and used_was_red(table, others_gb, red):
        assert pick(remaining) is None
    # cheapest first
    costs = [r.cost for r in evicted]
    assert costs == sorted(costs)


def used_was_red(table: list[Row], others_gb: int, red: int) -> bool:
    return others_gb * GB + sum(r.bytes for r in table) > red
