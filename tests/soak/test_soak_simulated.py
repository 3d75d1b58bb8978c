"""The soak workload against the simulated runtime (short in CI; MODELMORA_SOAK_OPS for long)."""

from __future__ import annotations

import json

import pytest
from conftest import make_manager

from modelmora.providers.simulated import SimulatedProvider

from .harness import GB, Faults, Soak, soak_ops

pytestmark = [pytest.mark.anyio, pytest.mark.soak]


def simulated_faults(sim: SimulatedProvider) -> Faults:
    def held() -> dict[str, int]:
        out: dict[str, int] = {}
        for r in sim.resident.values():
            for d, n in (r.asleep if r.asleep is not None else r.memory).items():
                out[d] = out.get(d, 0) + n
        return out

    def set_reachable(on: bool) -> None:
        sim.reachable = on

    return Faults(
        fail_next=lambda t: sim.fail_next(t),
        hang_next=lambda t: sim.hang(t, True),
        unhang=lambda t: sim.hang(t, False),
        evict=sim.evict_behind_back,
        set_reachable=set_reachable,
        held=held,
    )


@pytest.mark.parametrize("seed", [11, 12])
async def test_soak_on_the_simulated_runtime(seed: int, record_property: object) -> None:
    sim = SimulatedProvider()
    models = {
        f"m{i}": {
            "memory": f"{size}GB",
            "group": group,
            "warm_tier": warm,
            "keep_alive": ttl,
            "load_timeout": 0.3,
            "options": {"load_time": 0.002, "unload_time": 0.001 * (i % 3)},
        }
        for i, (size, group, warm, ttl) in enumerate(
            [(4, None, False, 0), (8, "heavy", True, 5), (12, "heavy", False, 0.05), (2, None, True, -1),
             (6, "light", False, 0.02), (16, None, False, 1), (3, "light", True, 0)]
        )
    }  # fmt: skip
    budgets = {"cuda:0": 24 * GB, "cpu": 40 * GB}
    async with make_manager(
        sim, models, budgets={"cuda:0": "24GB", "cpu": "40GB"}, wait_timeout=0.2,
        failure_cooldown=0.01, failure_cooldown_max=0.05, reconcile_interval=0.05, unload_timeout=1,
        outage_cooldown=0.01, outage_cooldown_max=0.05,
    ) as mm:  # fmt: skip
        soak = Soak(mm, simulated_faults(sim), list(models), budgets, seed=seed)
        result = await soak.run(soak_ops(1500))
        sim.reachable = True
        for entry in mm.entries():
            assert entry.leases == 0, entry
        await mm.unload_all(force=True)
        assert mm.entries() == [] and sim.resident == {}, "something stayed loaded"
    summary = result.summary()
    print(json.dumps(summary))
    assert not result.violations, result.violations[:5]
    assert summary["faults_injected"] > 100 and result.outcomes["lease ok"] > 100
