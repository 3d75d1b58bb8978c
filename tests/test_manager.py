"""ModelManager on the simulated provider: leases, singleflight, eviction, reaper, failures."""

from __future__ import annotations

import contextvars
import math
from typing import Any

import anyio
import pytest
from conftest import make_manager

from modelmora import (
    HandleClosed,
    InsufficientMemory,
    LoadFailed,
    ManagerClosed,
    ModelInUse,
    ModelManager,
    ModelMoraTimeout,
    ProviderUnavailable,
    RecentlyFailed,
    UnknownModel,
)
from modelmora import events as ev
from modelmora.memory import StaticProbe
from modelmora.providers.simulated import SimulatedProvider

pytestmark = pytest.mark.anyio
GB = 10**9


def record(mm: ModelManager) -> list[ev.Event]:
    seen: list[ev.Event] = []
    mm.events.subscribe(seen.append)
    return seen


async def test_thousand_concurrent_first_uses_load_once(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"m": {"memory": "4GB", "options": {"load_time": 0.05}}}) as mm:
        handles = []

        async def user() -> None:
            async with mm.use("m") as handle:
                handles.append(handle)
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            for _ in range(1000):
                tg.start_soon(user)
        assert sim.stats.loads == 1
        assert len(handles) == 1000 and len({id(h) for h in handles}) == 1
        assert mm.leases("m") == 0
        assert mm.is_loaded("m")


async def test_lease_gives_the_handle_and_counts(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"m": {"memory": "1GB"}}) as mm:
        async with mm.use("m") as a, mm.use("m") as b:
            assert a is b
            assert a.obj == "<simulated m>"
            assert mm.leases("m") == 2
        assert mm.leases("m") == 0


async def test_leased_model_is_not_unloaded_without_force(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"m": {"memory": "1GB"}}) as mm:
        async with mm.use("m") as handle:
            with pytest.raises(ModelInUse, match="in use by 1 lease"):
                await mm.unload("m")
            result = await mm.unload_all()
            assert result.in_use == ["m"] and result.unloaded == []
            assert mm.is_loaded("m")
            seen = record(mm)
            assert await mm.unload("m", force=True)
            assert not mm.is_loaded("m")
            with pytest.raises(HandleClosed, match="has been unloaded"):
                _ = handle.obj
            unloaded = [e for e in seen if isinstance(e, ev.Unloaded)]
            assert unloaded and unloaded[0].forced
        # releasing a lease on a force-unloaded model is harmless
        assert mm.leases("m") == 0
        assert sim.resident == {}


async def test_reaper_never_unloads_a_leased_model_but_reaps_idle_ones(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"m": {"memory": "1GB", "keep_alive": 0.05}}) as mm:
        async with mm.use("m"):
            await anyio.sleep(0.3)  # six TTLs, dozens of reaper passes
            assert mm.is_loaded("m")
        with anyio.fail_after(5):
            while mm.is_loaded("m"):
                await anyio.sleep(0.01)
        assert sim.resident == {}


async def test_keep_alive_zero_unloads_right_after_the_last_lease(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"m": {"memory": "1GB", "keep_alive": 0}}, reaper_interval=60) as mm:
        async with mm.use("m"), mm.use("m"):
            pass
        with anyio.fail_after(5):
            while mm.is_loaded("m"):
                await anyio.sleep(0.001)


async def test_eviction_never_picks_a_leased_model_and_waits_for_it(sim: SimulatedProvider) -> None:
    models = {"a": {"memory": "10GB"}, "b": {"memory": "10GB"}}
    async with make_manager(sim, models) as mm:
        order: list[str] = []
        async with anyio.create_task_group() as tg, mm.use("a"):

            async def want_b() -> None:
                async with mm.use("b"):
                    order.append("b loaded")

            tg.start_soon(want_b)
            await anyio.sleep(0.1)
            assert mm.is_loaded("a") and not mm.is_loaded("b")
            order.append("a released")
        assert order == ["a released", "b loaded"]
        assert mm.loaded() == ["b"]


async def test_waiting_for_memory_times_out_with_who_holds_it(sim: SimulatedProvider) -> None:
    models = {"a": {"memory": "10GB"}, "b": {"memory": "10GB"}}
    async with make_manager(sim, models, wait_timeout=0.2) as mm:
        async with mm.use("a"):
            with pytest.raises(ModelMoraTimeout, match=r"waiting for memory to load 'b'.*a: ready, 1 lease"):
                async with mm.use("b"):
                    pass
        assert mm.leases("a") == 0 and not mm.is_loaded("b")


async def test_a_timeout_while_looking_again_still_names_who_holds_the_memory(
    sim: SimulatedProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by CI (the test above failed once as "...: reading the devices' memory"): every
    pass of the admission loop said it was reading the devices' memory, so a deadline that
    fell while it looked again lost the holder the pass before had found.  Here every
    reading after b's first wait outlasts the deadline."""
    models = {"a": {"memory": "10GB"}, "b": {"memory": "10GB"}}
    async with make_manager(sim, models, wait_timeout=0.2) as mm:
        waiting = record(mm)
        refresh = mm._core.refresh_readings

        async def slow_after_the_first_wait() -> None:
            if any(isinstance(e, ev.Waiting) and e.model == "b" for e in waiting):
                await anyio.sleep(1)  # cancelled by b's deadline
            await refresh()

        async with mm.use("a"):
            monkeypatch.setattr(mm._core, "refresh_readings", slow_after_the_first_wait)
            with pytest.raises(ModelMoraTimeout, match=r"waiting for memory to load 'b'.*a: ready, 1 lease"):
                async with mm.use("b"):
                    pass
        assert mm.leases("a") == 0 and not mm.is_loaded("b")


async def test_waiters_are_served_in_fifo_order(sim: SimulatedProvider) -> None:
    models = {n: {"memory": "10GB"} for n in ("a", "b", "c", "d")}
    async with make_manager(sim, models) as mm:
        served: list[str] = []
        async with anyio.create_task_group() as tg, mm.use("a"):
            for name in ("b", "c", "d"):

                async def user(name: str = name) -> None:
                    async with mm.use(name):
                        served.append(name)
                        await anyio.sleep(0.01)

                tg.start_soon(user)
                await anyio.sleep(0.02)
        assert served == ["b", "c", "d"]


async def test_memory_freed_while_a_later_waiter_looks_again_goes_to_the_one_before_it(
    sim: SimulatedProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the flake audit: the test above failed as ['d', 'b', 'c'] under CPU load.  An
    admission reads the devices (in a worker thread) while it holds the admission turn, and
    memory freed meanwhile went to whoever held the turn: a later waiter overtook the one
    queued before it.  Here a's lease ends exactly while d's admission, waiting behind b's,
    looks again."""
    models = {n: {"memory": "10GB"} for n in ("a", "b", "d")}
    async with make_manager(sim, models) as mm:
        core, loader = mm._core, mm._leases.loader
        admitting: contextvars.ContextVar[str] = contextvars.ContextVar("admitting")
        admit, refresh = loader._admit, core.refresh_readings
        holder = mm.use("a")
        await holder.__aenter__()
        freed = anyio.Event()
        waiting = record(mm)

        async def admit_naming_it(entry: Any) -> None:
            admitting.set(entry.name)
            await admit(entry)

        async def refresh_freeing_a() -> None:
            d_waits = any(isinstance(e, ev.Waiting) and e.model == "d" for e in waiting)
            if admitting.get(None) == "d" and d_waits and not freed.is_set():
                freed.set()
                await holder.__aexit__(None, None, None)  # a's memory frees while d reads
            await refresh()

        monkeypatch.setattr(loader, "_admit", admit_naming_it)
        monkeypatch.setattr(core, "refresh_readings", refresh_freeing_a)
        served: list[str] = []

        async def user(name: str) -> None:
            async with mm.use(name):
                served.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(user, "b")
            with anyio.fail_after(30):
                while not any(isinstance(e, ev.Waiting) and e.model == "b" for e in waiting):
                    await anyio.sleep(0.01)
            tg.start_soon(user, "d")
        assert freed.is_set() and served == ["b", "d"]


async def test_too_big_is_refused_with_what_holds_memory(sim: SimulatedProvider) -> None:
    models = {"huge": {"memory": "20GB"}, "pin": {"memory": "10GB", "pinned": True}, "x": {"memory": "8GB"}}
    async with make_manager(sim, models) as mm:
        with pytest.raises(InsufficientMemory, match="needs 20.0 GB on cuda:0 but the budget is 16.0 GB"):
            await mm.load("huge")
        await mm.load("pin")
        with pytest.raises(
            InsufficientMemory, match=r"pinned models hold 10.0 GB.*\(resident: pin 10.0 GB\)"
        ):
            await mm.load("x")
        assert mm.loaded() == ["pin"]


async def test_exclusive_group_one_heavy_model_at_a_time(heavy_light: ModelManager) -> None:
    mm = heavy_light
    seen = record(mm)
    async with mm.use("qwen-14b"):
        pass
    async with mm.use("gpt-sovits"):
        pass
    async with mm.use("sdxl-base"):
        assert sorted(mm.loaded()) == ["gpt-sovits", "sdxl-base"]
    evicted = [e for e in seen if isinstance(e, ev.Evicted)]
    assert [(e.model, e.for_model) for e in evicted] == [("qwen-14b", "sdxl-base")]
    assert "exclusive group 'heavy'" in evicted[0].reason


async def test_failed_load_wakes_every_waiter_and_cools_down(sim: SimulatedProvider) -> None:
    sim.fail_next("m", times=1)
    async with make_manager(
        sim, {"m": {"memory": "1GB", "options": {"load_time": 0.05}}}, failure_cooldown=30
    ) as mm:
        errors: list[BaseException] = []

        async def user() -> None:
            try:
                async with mm.use("m"):
                    pass
            except LoadFailed as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(user)
        assert len(errors) == 20 and len({id(e) for e in errors}) == 1
        assert sim.stats.loads == 1
        with pytest.raises(RecentlyFailed, match="next attempt allowed in") as info:
            await mm.load("m")
        assert 0 < info.value.retry_after <= 30
        assert sim.stats.loads == 1
        await mm.load("m", retry=True)  # explicit retry skips the cool-down
        assert mm.is_loaded("m") and sim.stats.loads == 2
        assert "m" not in (await mm.status()).failures


async def test_cool_down_expires_and_grows(sim: SimulatedProvider) -> None:
    sim.fail_next("m", times=2)
    now = [1000.0]  # the manager's clock, moved by the test alone (a slow machine moves no cool-down)
    config = {"budgets": {"cuda:0": "16GB"}, "failure_cooldown": 4, "models": {"m": {"memory": "1GB"}}}
    async with ModelManager(
        config, providers={"simulated": sim}, probe=StaticProbe({}), clock=lambda: now[0]
    ) as mm:
        with pytest.raises(LoadFailed):
            await mm.load("m")
        with pytest.raises(RecentlyFailed) as info:
            await mm.load("m")
        assert info.value.retry_after == 4
        now[0] += 4
        with pytest.raises(LoadFailed):
            await mm.load("m")
        with pytest.raises(RecentlyFailed) as info:
            await mm.load("m")
        assert info.value.retry_after == 8  # second failure: doubled back-off
        now[0] += 7.5
        with pytest.raises(RecentlyFailed):
            await mm.load("m")
        now[0] += 0.5
        await mm.load("m")
        assert mm.is_loaded("m") and sim.stats.loads == 3


async def test_cancelled_waiter_leaves_no_stray_lease(sim: SimulatedProvider) -> None:
    """The only waiter leaves mid-load: no lease is left, and the load nobody waits for is
    stopped (issue 25 item 4), so the next caller loads afresh."""
    async with make_manager(sim, {"m": {"memory": "1GB", "options": {"load_time": 0.2}}}) as mm:
        abandoned: list[ev.Event] = []
        mm.events.subscribe(lambda e: abandoned.append(e) if isinstance(e, ev.LoadAbandoned) else None)
        with anyio.move_on_after(0.05):
            async with mm.use("m"):
                pytest.fail("the load takes longer than the cancel")
        assert mm.leases("m") == 0
        async with mm.use("m"):
            assert mm.leases("m") == 1
        assert mm.leases("m") == 0 and sim.stats.loads == 2
        assert [(e.model, getattr(e, "stage", None)) for e in abandoned] == [("m", "loading")]


async def test_cancelled_waiter_for_memory_gives_up_its_load(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"a": {"memory": "10GB"}, "b": {"memory": "10GB"}}) as mm:
        async with mm.use("a"):
            with anyio.move_on_after(0.1):
                await mm.load("b")
            await anyio.sleep(0.05)
            assert mm.leases("b") == 0 and not mm.is_loaded("b")
            assert [e.name for e in mm.entries()] == ["a"]
        assert sim.stats.loads == 1


async def test_timeout_on_use(sim: SimulatedProvider) -> None:
    sim.hang("m")
    async with make_manager(sim, {"m": {"memory": "1GB"}}) as mm:
        with pytest.raises(ModelMoraTimeout, match="waiting for 'm' to load"):
            async with mm.use("m", timeout=0.05):
                pass
        assert mm.leases("m") == 0


async def test_load_timeout_counts_as_failure(sim: SimulatedProvider) -> None:
    sim.hang("m")
    async with make_manager(sim, {"m": {"memory": "1GB", "load_timeout": 0.05}}) as mm:
        with pytest.raises(LoadFailed, match="longer than its load_timeout"):
            await mm.load("m")
        assert not mm.is_loaded("m") and mm.usage().get("cuda:0", 0) == 0


async def test_adoption_at_start_up(sim: SimulatedProvider) -> None:
    sim.preload("qwen2.5:14b", {"cuda:0": 12 * GB})
    sim.preload("someone-elses-model", {"cuda:0": 2 * GB})
    models = {"qwen-14b": {"target": "qwen2.5:14b", "memory": "11.5GB"}}
    async with make_manager(sim, models) as mm:
        assert sorted(mm.loaded()) == ["qwen-14b", "simulated/someone-elses-model"]
        assert mm.usage() == {"cuda:0": 14 * GB}  # measured sizes, not estimates
        status = {m.name: m for m in (await mm.status()).models}
        assert not status["simulated/someone-elses-model"].owned
        async with mm.use("qwen-14b"):
            pass
        assert sim.stats.loads == 0
        assert await mm.unload("simulated/someone-elses-model")
        assert "someone-elses-model" not in sim.resident


async def test_adopted_models_are_not_reaped_but_can_be_evicted(sim: SimulatedProvider) -> None:
    sim.preload("theirs", {"cuda:0": 10 * GB})
    async with make_manager(sim, {"mine": {"memory": "10GB"}}, idle_ttl=0.01) as mm:
        await anyio.sleep(0.1)
        assert mm.is_loaded("simulated/theirs")
        await mm.load("mine")
        assert mm.loaded() == ["mine"]


async def test_model_vanishing_behind_our_back_is_reconciled(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"m": {"memory": "4GB"}}) as mm:
        seen = record(mm)
        await mm.load("m")
        sim.evict_behind_back("m")
        await mm.reconcile()
        assert not mm.is_loaded("m")
        assert any(isinstance(e, ev.Vanished) for e in seen)
        await mm.load("m")
        assert sim.stats.loads == 2


async def test_unreachable_runtime_keeps_the_table(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"m": {"memory": "4GB"}}) as mm:
        await mm.load("m")
        sim.reachable = False
        await mm.reconcile()
        assert mm.is_loaded("m")


async def test_measured_size_replaces_estimate_and_rebalances(sim: SimulatedProvider) -> None:
    models = {
        "a": {"memory": "6GB"},
        "b": {"memory": "6GB", "options": {"actual_memory": {"cuda:0": 12 * GB}}},
    }
    async with make_manager(sim, models) as mm:
        await mm.load("a")
        evicted = anyio.Event()
        mm.events.subscribe(
            lambda e: evicted.set() if isinstance(e, ev.Unloaded) and e.model == "a" else None
        )
        await mm.load("b")  # estimate fits beside a; the measurement does not
        await evicted.wait()  # the rebalance runs once b's callers are served
        assert mm.loaded() == ["b"]
        assert mm.usage() == {"cuda:0": 12 * GB}


async def test_unknown_model_suggests(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"qwen-14b": {}}) as mm:
        with pytest.raises(UnknownModel, match="did you mean 'qwen-14b'"):
            async with mm.use("qwen-41b"):
                pass
        with pytest.raises(UnknownModel):
            await mm.unload("nope")


async def test_inline_provider_slash_target_names(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {}) as mm, mm.use("simulated/tiny:1b") as handle:
        assert handle.target == "tiny:1b"


async def test_manual_load_pin_and_keep_alive(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"a": {"memory": "10GB"}, "b": {"memory": "10GB"}}, idle_ttl=0.05) as mm:
        await mm.load("a", pin=True)
        await anyio.sleep(0.15)
        assert mm.is_loaded("a")  # pinned: not reaped
        with pytest.raises(InsufficientMemory, match="pinned"):
            await mm.load("b")
        mm.unpin("a")
        await mm.load("b", keep_alive=math.inf)
        await anyio.sleep(0.15)
        assert mm.loaded() == ["b"]


async def test_unload_all(sim: SimulatedProvider) -> None:
    models = {"a": {"memory": "1GB"}, "b": {"memory": "1GB", "pinned": True}, "c": {"memory": "1GB"}}
    async with make_manager(sim, models) as mm:
        for n in models:
            await mm.load(n)
        async with mm.use("c"):
            result = await mm.unload_all()
            assert (result.unloaded, result.in_use, result.pinned) == (["a"], ["c"], ["b"])
            result = await mm.unload_all(force=True)
            assert sorted(result.unloaded) == ["b", "c"]
        assert mm.loaded() == [] and sim.resident == {}


async def test_use_outside_the_context_is_a_clear_error(sim: SimulatedProvider) -> None:
    mm = make_manager(sim, {"m": {}})
    with pytest.raises(ManagerClosed, match="async with ModelManager"):
        async with mm.use("m"):
            pass


async def test_unload_on_exit(sim: SimulatedProvider) -> None:
    mm = make_manager(sim, {"m": {"memory": "1GB"}})
    mm.unload_on_exit = True
    async with mm:
        await mm.load("m")
    assert sim.resident == {}


async def test_restart_adopts_what_the_runtime_still_has(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"m": {"memory": "1GB"}}) as mm:
        await mm.load("m")
    async with make_manager(sim, {"m": {"memory": "1GB"}}) as mm2:
        assert mm2.loaded() == ["m"]
        assert await mm2.unload("m")
    assert sim.resident == {}


async def test_default_model_and_repr(sim: SimulatedProvider) -> None:
    async with make_manager(sim, {"m": {"memory": "1GB"}}, default_model="m") as mm, mm.use() as handle:
        assert handle.name == "m"
        assert "m(ready, 1 leases)" in repr(mm)
        assert "cuda:0 1.0 GB/16.0 GB" in repr(mm)


async def test_status_reports_memory_and_entries(heavy_light: ModelManager) -> None:
    mm = heavy_light
    async with mm.use("qwen-14b"):
        status = await mm.status()
    dev = status.memory.devices["cuda:0"]
    assert dev.budget == 15_500_000_000 and dev.modelmora == 11_500_000_000 and dev.peak == 11_500_000_000
    assert not status.memory.gpu_observed
    [model] = status.models
    assert (model.name, model.state, model.leases, model.group) == ("qwen-14b", "ready", 1, "heavy")
    data = status.to_dict()
    assert data["devices"]["cuda:0"]["budget"] == 15_500_000_000
    assert heavy_light.can_fit("gpt-sovits") and not heavy_light.can_fit("sdxl-base")


async def test_unknown_provider_fails_at_start_with_the_field() -> None:
    from modelmora import ConfigError
    from modelmora.memory import StaticProbe

    mm = ModelManager({"models": {"m": {"provider": "olama"}}}, probe=StaticProbe({}))
    with pytest.raises(
        ConfigError, match=r"models.m.provider: unknown provider type 'olama' \(available: .*ollama"
    ):
        async with mm:
            pass


async def test_errors_in_the_body_are_not_wrapped_in_exception_groups(sim: SimulatedProvider) -> None:
    with pytest.raises(UnknownModel):
        async with make_manager(sim, {"m": {}}) as mm:
            await mm.load("nope")


async def test_an_unreachable_runtime_is_not_a_model_failure(sim: SimulatedProvider) -> None:
    # the provider cools down (its outage, issue 26), not the model: once the provider's
    # 5 s cool-down has passed on the manager's clock, the model's 60 s one never started
    now = [1000.0]
    cfg: dict[str, Any] = {
        "budgets": {"cuda:0": "16GB"}, "failure_cooldown": 60, "outage_cooldown": 5,
        "models": {"m": {"memory": "1GB"}},
    }  # fmt: skip
    async with ModelManager(
        cfg, providers={"simulated": sim}, probe=StaticProbe({}), clock=lambda: now[0]
    ) as mm:
        sim.reachable = False
        with pytest.raises(ProviderUnavailable):
            await mm.load("m")
        sim.reachable = True
        now[0] += 6
        await mm.load("m")  # no model cool-down: the runtime was down, not the model
        assert mm.is_loaded("m") and mm.outages() == {}


async def test_a_victim_leased_while_another_is_evicted_is_not_unloaded(sim: SimulatedProvider) -> None:
    # Found by the long Ollama soak: evictions ran one after another, and a victim chosen
    # while idle could be leased by the time its turn came.  Now every victim is claimed in
    # the same step as the admission: a lease asked for meanwhile waits for the unload and
    # gets a fresh load, and no model is unloaded while leased.
    models = {
        "a": {"memory": "6GB", "options": {"unload_time": 0.2}},
        "b": {"memory": "6GB"},
        "c": {"memory": "12GB"},
    }
    unloaded_while_leased: list[str] = []
    async with make_manager(sim, models, budgets={"cuda:0": "16GB"}, idle_ttl=60) as mm:
        mm.events.subscribe(
            lambda e: (
                unloaded_while_leased.append(e.model)
                if isinstance(e, ev.Unloading) and not e.forced and mm.leases(e.model)
                else None
            )
        )
        await mm.load("a")
        await mm.load("b")
        async with anyio.create_task_group() as tg:
            tg.start_soon(mm.load, "c")
            with anyio.fail_after(5):
                while mm.is_loaded("a"):  # until a's eviction is under way
                    await anyio.sleep(0.01)
            async with mm.use("b") as handle:  # b was chosen as a victim while idle
                assert not handle.closed and mm.is_loaded("b") and mm.leases("b") == 1
                await anyio.sleep(0.3)
                assert not handle.closed and mm.is_loaded("b")
        assert sim.stats.loads == 4  # a, b, c, and b again after its eviction
    assert unloaded_while_leased == []


async def test_a_per_call_keep_alive_of_minus_one_means_forever(sim: SimulatedProvider) -> None:
    # Found in review: use(keep_alive=-1) stored -1, which made the model expire at once;
    # negative means forever, as in the registry and in Ollama's keep_alive.
    async with make_manager(sim, {"a": {"memory": "4GB"}}, idle_ttl=0.05) as mm:
        async with mm.use("a", keep_alive=-1):
            pass
        await mm.load("a", keep_alive=-1)
        await anyio.sleep(0.3)  # several reaper ticks past the manager's idle_ttl
        assert mm.is_loaded("a")
        (status,) = (await mm.status()).models
        assert status.expires_in_s is None
