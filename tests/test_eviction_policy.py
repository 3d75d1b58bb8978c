"""Issue 24: the manager evicts what costs least to lose, not merely the least recently used.

The runtime is simulated and the manager's clock is a counter that a load advances by the
model's ``load_time``: the load seconds the policy reads are exact, and nothing depends on
how fast this machine is.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from modelmora import ModelManager
from modelmora.memory import StaticProbe
from modelmora.providers.base import Handle
from modelmora.providers.simulated import SimulatedProvider
from modelmora.spec import ModelSpec
from modelmora.testing.traces import agent_bursts_random

pytestmark = pytest.mark.anyio

PERIOD = "aaabcabac"  # issue 24's periodic trace: 20 periods, 180 requests, room for two


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedSim(SimulatedProvider):
    """A load takes its spec's ``load_time`` on the manager's clock, and no wall time."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock = clock

    async def load(self, spec: ModelSpec) -> Handle:
        self.clock.now += spec.load_time or 0.0
        return await super().load(spec)


def manager(sim: TimedSim, models: dict[str, Any], **config: Any) -> ModelManager:
    cfg: dict[str, Any] = {"budgets": {"cuda:0": "16GB"}, **config, "models": models}
    return ModelManager(cfg, providers={"simulated": sim}, probe=StaticProbe({}), clock=sim.clock)


async def replay(mm: ModelManager, trace: list[str], clock: Clock) -> None:
    """One request after the other, each served in 1 s (on the manager's clock)."""
    for name in trace:
        async with mm.use(name):
            clock.now += 1.0


async def test_periodic_three_model_trace_needs_at_most_85_loads() -> None:
    """LRU reloads on 101 of the 180 requests (the optimum is 62); frequency keeps ``a``."""
    sim = TimedSim(Clock())
    models = {n: {"memory": "8GB", "load_time": 5.0} for n in "abc"}
    async with manager(sim, models) as mm:
        await replay(mm, list(PERIOD * 20), sim.clock)
    assert sim.stats.loads <= 85


def belady_loads(trace: list[str], room: int) -> int:
    """Loads of Belady's rule (evict the model needed furthest ahead) with room for
    ``room`` equal models: the offline optimum for equal sizes and load times."""
    resident: set[str] = set()
    loads = 0
    for i, name in enumerate(trace):
        if name in resident:
            continue
        loads += 1
        if len(resident) == room:
            ahead = trace[i + 1 :]
            resident.remove(max(resident, key=lambda r: ahead.index(r) if r in ahead else len(ahead)))
        resident.add(name)
    return loads


async def test_a_loop_longer_than_the_room_is_not_reloaded_on_every_request() -> None:
    """Issue 24's agent loops: six equal models called in turn with room for four.  LRU
    evicts exactly the model needed next and reloads on every request; Belady keeps
    most of the loop.  The default policy must need at most 0.85 × LRU's loads (the
    issue's target) and at most 1.25 × Belady's, measured in the same run (red before
    the set duel: 124 loads, LRU 180, Belady 74)."""
    trace = list("abcdef" * 30)
    loads = {}
    for policy in ("cost", "lru"):
        sim = TimedSim(Clock())
        models = {n: {"memory": "4GB", "load_time": 5.0} for n in "abcdef"}
        async with manager(sim, models, eviction=policy) as mm:  # 16 GB: room for four
            await replay(mm, trace, sim.clock)
        loads[policy] = sim.stats.loads
    assert loads["lru"] == len(trace)  # every request: the trace is LRU's worst case
    assert loads["cost"] <= 0.85 * loads["lru"], loads
    assert loads["cost"] <= 1.25 * belady_loads(trace, 4), (loads, belady_loads(trace, 4))


async def test_a_lease_on_a_resident_model_prices_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease hot path: the shadow caches need a model's cost only when one of them
    misses it, so 200 leases on two resident models price each model at most once or
    twice, not once per lease (the review found O(models) work on every grant: 318 µs a
    use() with 200 models loaded, against 3.7 µs before the set duel)."""
    from modelmora.core.context import Core

    priced: list[str] = []
    real = Core.reload_seconds

    def counting(self: Core, name: str) -> float:
        priced.append(name)
        return real(self, name)

    monkeypatch.setattr(Core, "reload_seconds", counting)
    sim = TimedSim(Clock())
    models = {n: {"memory": "4GB", "load_time": 5.0} for n in "ab"}
    async with manager(sim, models) as mm:
        await replay(mm, list("ab" * 100), sim.clock)
    assert sim.stats.loads == 2
    assert len(priced) <= 4, len(priced)


async def test_lru_stays_available_per_manager() -> None:
    sim = TimedSim(Clock())
    models = {n: {"memory": "8GB", "load_time": 5.0} for n in "abc"}
    async with manager(sim, models, eviction="lru") as mm:
        await replay(mm, list(PERIOD * 20), sim.clock)
    assert sim.stats.loads == 101


def slow_fast_x() -> dict[str, Any]:
    return {
        "slow": {"memory": "8GB", "load_time": 40.0},
        "fast": {"memory": "8GB", "load_time": 2.0},
        "x": {"memory": "8GB", "load_time": 2.0},
    }


async def test_the_model_slow_to_reload_stays_though_used_less_recently() -> None:
    sim = TimedSim(Clock())
    async with manager(sim, slow_fast_x()) as mm:
        await replay(mm, ["slow", "fast", "x"], sim.clock)
        assert sorted(mm.loaded()) == ["slow", "x"]


async def test_lru_evicts_the_least_recently_used_whatever_it_costs() -> None:
    sim = TimedSim(Clock())
    async with manager(sim, slow_fast_x(), eviction="lru") as mm:
        await replay(mm, ["slow", "fast", "x"], sim.clock)
        assert sorted(mm.loaded()) == ["fast", "x"]


async def test_the_bigger_of_two_equally_costly_models_goes_when_one_is_enough() -> None:
    """GDSF weighs reload seconds per byte freed on the contended device: a 4 GB model and
    a 10 GB one that reload in the same time and were used alike; either makes room for a
    6 GB one, and the 10 GB one goes though the 4 GB one was used less recently."""
    sim = TimedSim(Clock())
    models = {
        "small": {"memory": "4GB", "load_time": 10.0},
        "big": {"memory": "10GB", "load_time": 10.0},
        "new": {"memory": "6GB", "load_time": 1.0},
    }
    async with manager(sim, models) as mm:
        await replay(mm, ["small", "big", "small", "big"], sim.clock)
        await replay(mm, ["new"], sim.clock)
        assert sorted(mm.loaded()) == ["new", "small"]


def test_an_unknown_policy_is_one_clear_error() -> None:
    from modelmora.config import ManagerConfig
    from modelmora.errors import ConfigError

    with pytest.raises((ConfigError, ValueError)) as info:
        ManagerConfig.from_dict({"eviction": "mru"})
    assert "eviction" in str(info.value)
    assert "lru" in str(info.value)


class NoisySim(TimedSim):
    """A load takes its spec's ``load_time`` times a factor drawn per load: what the
    manager measures is noisy, the true load time is the same for every load."""

    def __init__(self, clock: Clock, factors: list[float]):
        super().__init__(clock)
        self.factors = factors

    async def load(self, spec: ModelSpec) -> Handle:
        self.clock.now += (spec.load_time or 0.0) * self.factors[self.stats.loads % len(self.factors)]
        return await SimulatedProvider.load(self, spec)


def noise(kind: str, seed: int) -> list[float]:
    rng = random.Random(seed)
    if kind == "uniform":  # ±30 %
        return [rng.uniform(0.7, 1.3) for _ in range(500)]
    return [0.5 * (1 - rng.random()) ** (-1 / 1.5) for _ in range(500)]  # Pareto α 1.5, heavy tail


@pytest.mark.parametrize(
    ("kind", "seed"), [("uniform", s) for s in range(4)] + [("heavy", s) for s in range(4)]
)
async def test_noisy_load_times_of_equal_models_never_cost_more_loads_than_lru(kind: str, seed: int) -> None:
    """Issue 24 on the real llama-server: three equal models whose measured loads varied
    0.05–1.54 s made ``cost`` keep whichever loaded slowly last (27–31 loads, LRU 25).
    Equal sizes on one provider, the same true load time, noise on every load: the
    default policy needs fewer loads than LRU on that benchmark's trace."""
    loads = {}
    for policy in ("cost", "lru"):
        sim = NoisySim(Clock(), noise(kind, seed))
        models = {n: {"memory": "8GB", "load_time": 1.0} for n in ("m0", "m1", "m2")}
        async with manager(sim, models, eviction=policy) as mm:
            await replay(mm, agent_bursts_random(["m0", "m1", "m2"], 120, 0), sim.clock)
        loads[policy] = sim.stats.loads
    assert loads["cost"] < loads["lru"], loads
