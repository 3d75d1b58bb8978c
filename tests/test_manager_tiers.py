"""The warm tier: models with warm_tier park (vLLM sleep / torch offload) instead of unloading."""

from __future__ import annotations

import anyio
import pytest
from conftest import make_manager

from modelmora import ModelManager
from modelmora import events as ev
from modelmora.providers.simulated import SimulatedProvider

pytestmark = pytest.mark.anyio
GB = 10**9


def record(mm: ModelManager) -> list[ev.Event]:
    seen: list[ev.Event] = []
    mm.events.subscribe(seen.append)
    return seen


MODELS = {
    "qwen": {"memory": "10GB", "warm_tier": True, "group": "heavy"},
    "sdxl": {"memory": "10GB", "group": "heavy"},
}


async def test_evicted_warm_model_is_parked_then_woken_not_reloaded(sim: SimulatedProvider) -> None:
    async with make_manager(sim, MODELS) as mm:
        seen = record(mm)
        await mm.load("qwen")
        await mm.load("sdxl")
        status = {m.name: m for m in (await mm.status()).models}
        assert status["qwen"].state == "sleeping"
        assert status["qwen"].memory == {"cpu": 10 * GB}  # nothing left on the GPU
        assert mm.usage() == {"cuda:0": 10 * GB, "cpu": 10 * GB}
        async with mm.use("qwen") as handle:
            assert handle.obj == "<simulated qwen>"
            assert mm.usage()["cuda:0"] == 10 * GB  # sdxl (no warm tier) made room
        assert (sim.stats.loads, sim.stats.sleeps, sim.stats.wakes) == (2, 1, 1)
        kinds = [e.kind for e in seen if not isinstance(e, ev.LeaseAcquired | ev.LeaseReleased)]
        assert "Slept" in kinds and "Woke" in kinds
        assert [e.model for e in seen if isinstance(e, ev.Unloaded)] == ["sdxl"]


async def test_idle_warm_model_parks_instead_of_unloading(sim: SimulatedProvider) -> None:
    models = {"qwen": {"memory": "10GB", "warm_tier": True, "keep_alive": 0.05}}
    async with make_manager(sim, models) as mm:
        await mm.load("qwen")
        with anyio.fail_after(5):
            while mm.entries()[0].state.value != "sleeping":
                await anyio.sleep(0.01)
        assert mm.is_loaded("qwen") and sim.stats.unloads == 0
        await mm.unload("qwen")  # a parked model still unloads on request
        assert sim.resident == {} and sim.stats.unloads == 1


async def test_parking_falls_back_to_unloading_when_ram_is_short(sim: SimulatedProvider) -> None:
    async with make_manager(sim, MODELS, budgets={"cuda:0": "16GB", "cpu": "4GB"}) as mm:
        await mm.load("qwen")
        await mm.load("sdxl")
        assert mm.loaded() == ["sdxl"] and sim.stats.sleeps == 0


async def test_concurrent_uses_of_a_parked_model_wake_it_once(sim: SimulatedProvider) -> None:
    models = {
        "qwen": {"memory": "10GB", "warm_tier": True, "options": {"wake_time": 0.05}},
        "other": {"memory": "10GB"},
    }
    async with make_manager(sim, models) as mm:
        await mm.load("qwen")
        await mm.load("other")
        assert sim.stats.sleeps == 1

        async def user() -> None:
            async with mm.use("qwen"):
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(user)
        assert sim.stats.wakes == 1 and sim.stats.loads == 2


async def test_cancelled_wake_leaves_the_model_parked(sim: SimulatedProvider) -> None:
    async with make_manager(
        sim, {"qwen": {"memory": "10GB", "warm_tier": True}, "big": {"memory": "10GB"}}
    ) as mm:
        await mm.load("qwen")
        async with mm.use("big"):  # holds the GPU: the wake has to wait for memory
            with anyio.move_on_after(0.05):
                await mm.load("qwen")
            await anyio.sleep(0.02)
            [qwen] = [e for e in mm.entries() if e.name == "qwen"]
            assert qwen.state.value == "sleeping" and qwen.leases == 0
        await mm.load("qwen")
        assert sim.stats.wakes == 1


async def test_restart_adopts_a_parked_model_and_wakes_it(sim: SimulatedProvider) -> None:
    async with make_manager(sim, MODELS) as mm:
        await mm.load("qwen")
        await mm.load("sdxl")
    async with make_manager(sim, MODELS) as mm2:
        status = {m.name: m.state for m in (await mm2.status()).models}
        assert status == {"qwen": "sleeping", "sdxl": "ready"}
        async with mm2.use("qwen"):
            pass
        assert sim.stats.wakes == 1 and sim.stats.loads == 2


async def test_manual_park(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"qwen": {"memory": "10GB"}}) as mm:
        await mm.load("qwen")
        async with mm.use("qwen"):
            assert not await mm.park("qwen")  # leased
        assert await mm.park("qwen")
        assert mm.entries()[0].state.value == "sleeping"
        assert not await mm.park("qwen")  # already parked
        assert not await mm.park("nope")


async def test_manual_park_refuses_when_the_warm_copy_would_overflow_ram(sim: SimulatedProvider) -> None:
    # Found in review: park() skipped the RAM check the reaper makes, so a 10 GB GPU model
    # parked into a 4 GB RAM budget was counted 10 GB over it.
    async with make_manager(sim, {"qwen": {"memory": "10GB"}}, budgets={"cuda:0": "16GB", "cpu": "4GB"}) as mm:
        await mm.load("qwen")
        assert not await mm.park("qwen")
        assert mm.entries()[0].state.value == "ready" and sim.stats.sleeps == 0
        assert mm.usage().get("cpu", 0) <= 4 * 10**9
