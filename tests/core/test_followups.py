"""Follow-ups to issue 15 (gaps left by the core rebuild): wakes of adopted sleeping
models, half-loaded failed loads, runtime deaths during a park or wake, waiters held up by
evictions after their load, and leaked bytes on a measured GPU.

Each test failed on the code before its fix, for the reason its docstring gives."""

from __future__ import annotations

import contextlib

import anyio
import pytest

from modelmora import LoadFailed, ModelManager, ModelMoraError
from modelmora.core import Admit
from modelmora.providers.base import Tier
from modelmora.testing.faulty import FaultyProvider, Op, gb

from .support import GB, faulty_manager, hold, model, overcommits, release_all, settle

pytestmark = pytest.mark.anyio

BUDGET = {"cuda:0": 16 * GB}


# -- leaked bytes on a measured GPU ------------------------------------------------------------


async def test_leaked_bytes_on_a_measured_gpu_are_counted_once() -> None:
    """A provider's ``leaked()`` bytes are in the device reading too: the headroom on a
    measured card must count them once, not twice."""
    faulty = FaultyProvider(devices={"cuda:0": gb(24)})  # a measured 24 GB card, 16 GB budget
    async with faulty_manager(faulty, {"a": model(10)}, probe=faulty.probe) as mm:
        faulty.leaks["cuda:0"] = gb(4)  # an unloaded model object somebody still references
        await mm.status()  # a fresh reading: 4 GB used, all of it the leak
        headroom = mm.headroom()["cuda:0"]
        plan = mm.plan("a")
    assert headroom == gb(12), f"headroom {headroom / GB:g} GB with a 4 GB leak on a 16 GB budget"
    assert isinstance(plan, Admit) and not plan.evict, plan


# -- waiters held up by the evictions after their load -----------------------------------------


async def test_a_loads_waiters_are_served_before_its_rebalance_evictions_finish() -> None:
    """A load that measured more than its estimate evicts idle models afterwards
    (``_rebalance``); the model is ready, so its waiters must not wait for those unrelated
    unloads (bounded only by ``unload_timeout``)."""
    faulty = FaultyProvider()
    faulty.measure("a", {"cuda:0": gb(10)})  # the spec says 4 GB; it takes 10
    async with faulty_manager(faulty, {"a": model(4), "b": model(8)}) as mm:
        await mm.load("b")  # idle: 4 + 8 fit, but 10 + 8 do not
        faulty.hold("unload", "b", times=1)
        async with anyio.create_task_group() as tg:
            a = hold(tg, mm, "a")
            await faulty.wait_pending("unload", "b")  # a is loaded, b's eviction runs
            await settle()
            served_during_eviction = a.granted.is_set()
            faulty.release("unload", "b")
            await a.granted.wait()
            await release_all(a)
        assert not mm.is_loaded("b")
    assert served_during_eviction, "a is ready but its caller waits until b's unload returns"


# -- waking an adopted sleeping model ----------------------------------------------------------


async def wake_beside_a_load(mm: ModelManager, faulty: FaultyProvider, sleeper: str) -> None:
    """Wake ``sleeper`` (runtime target ``f``) with its wake held, ask for ``b`` meanwhile (it
    does not fit beside f awake: it must wait), then let the wake finish and both go."""
    faulty.hold("wake", "f", times=1)
    async with anyio.create_task_group() as tg:
        f = hold(tg, mm, sleeper)
        await faulty.wait_pending("wake", "f")
        b = hold(tg, mm, "b")
        await settle()
        faulty.release("wake", "f")
        await f.granted.wait()
        await release_all(f)
        await b.granted.wait()
        await release_all(b)


@pytest.mark.parametrize("reported", [True, False], ids=["awake-reported", "awake-unknown"])
async def test_waking_an_adopted_unregistered_sleeping_model_reserves_its_awake_footprint(
    reported: bool,
) -> None:
    """A model found asleep (vLLM sleep mode) is adopted with what it holds asleep; its
    wake must reserve what it holds awake (as the runtime reports it, else conservatively),
    so a load beside it waits instead of overcommitting the GPU."""
    faulty = FaultyProvider()
    faulty.report_awake = reported
    faulty.add_foreign("f", {"cuda:0": gb(10)}, tier=Tier.SLEEPING)  # 10 GB once awake
    async with faulty_manager(faulty, {"b": model(10)}) as mm:
        assert mm.is_parked("faulty/f")
        await wake_beside_a_load(mm, faulty, "faulty/f")  # 10 + 10 GB do not fit 16
    assert overcommits(faulty, BUDGET) == []
    assert faulty.peak["cuda:0"] <= BUDGET["cuda:0"], f"the GPU held {faulty.peak['cuda:0'] / GB:g} GB"


# -- a runtime death reported while a model is in transition -----------------------------------


@pytest.mark.parametrize("op", ["sleep", "wake", "unload"])
async def test_a_death_reported_during_a_park_wake_or_unload_is_applied_when_it_finishes(op: Op) -> None:
    """The runtime of ``p`` dies while its sleep, wake or unload is running, and reports it
    (``report_lost``).  When that call then answers (sleep/wake: it did its work before
    the crash; unload: it fails), the death must still be applied: ``p`` leaves the table,
    and a caller waiting for the wake gets a live model (a fresh load) or a clear error."""
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"p": model(8, warm_tier=True)}) as mm:
        await mm.load("p")
        if op == "wake":
            assert await mm.park("p")
        faulty.hold(op, "p", times=1)
        async with anyio.create_task_group() as tg:
            if op == "sleep":
                tg.start_soon(mm.park, "p")
            elif op == "unload":
                tg.start_soon(_unload_quietly, mm, "p")
            waker = hold(tg, mm, "p") if op == "wake" else None
            await faulty.wait_pending(op, "p")
            await faulty.crash("p", answered=True)
            error = RuntimeError("the runtime is gone") if op == "unload" else None
            faulty.release(op, "p", error=error)
            await settle()
            served = ""
            if waker is not None:
                handle = waker.handle if waker.granted.is_set() else None
                live = handle is not None and faulty.instance_of(handle) is not None
                served = f"granted: {waker.granted.is_set()}, a live model: {live}, error: {waker.error!r}"
            rows = {e.name: e.state.value for e in mm.entries()}
            truth = faulty.describe()
            tg.cancel_scope.cancel()  # the waker, if it still waits
    if waker is not None:
        assert live or waker.error is not None, f"the caller waiting for p's wake: {served} ({truth})"
    else:
        assert "p" not in rows, f"p is {rows['p']} in the table after its runtime died: {truth}"


async def _unload_quietly(mm: ModelManager, name: str) -> None:
    with contextlib.suppress(ModelMoraError):
        await mm.unload(name)


async def test_a_model_found_again_asleep_is_not_reserved_at_the_size_it_had_before() -> None:
    """``f`` was adopted awake at 3 GB (a spec made up for it), dropped, and found again
    asleep at 10 GB with no awake size reported: its wake must not reserve the 3 GB of the
    spec made up the first time."""
    faulty = FaultyProvider()
    faulty.report_awake = False
    faulty.add_foreign("f", {"cuda:0": gb(3)})
    async with faulty_manager(faulty, {"b": model(10)}) as mm:
        faulty.evict("f")
        await mm.reconcile()  # f left the runtime: it leaves the table
        faulty.add_foreign("f", {"cuda:0": gb(10)}, tier=Tier.SLEEPING)
        await mm.reconcile()
        await settle()  # the adoption
        assert mm.is_parked("faulty/f")
        await wake_beside_a_load(mm, faulty, "faulty/f")
    assert overcommits(faulty, BUDGET) == []


# -- a load that fails partway -----------------------------------------------------------------


async def test_a_load_that_fails_partway_is_cleaned_up() -> None:
    """The runtime holds ``b`` (a process started, memory taken) when its load raises: the
    manager asks the provider to clean up, and the caller gets the load's error."""
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"b": model(10)}) as mm:
        faulty.fail_partway("b")
        with pytest.raises(LoadFailed, match="partway"):
            await mm.load("b")
        truth = faulty.describe()
        rows = [e.name for e in mm.entries()]
    assert "b" not in faulty.instances, f"a failed load of b left it in the runtime: {truth}; table {rows}"


async def test_a_load_that_fails_partway_stays_counted_until_its_cleanup_is_done() -> None:
    """While the cleanup of a half-loaded ``b`` runs, its bytes stay reserved: a load of
    ``c`` beside it waits instead of overcommitting the GPU; a cleanup that fails is
    logged, not raised to the caller."""
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"b": model(10), "c": model(10)}) as mm:
        faulty.hold("load", "b", times=1)
        faulty.hold("unload", "b", times=1)  # the cleanup, once it comes
        async with anyio.create_task_group() as tg:
            b = hold(tg, mm, "b")
            await faulty.wait_pending("load", "b")
            faulty.release("load", "b", error=LoadFailed("the server died loading b"), partway=True)
            await settle()
            hold(tg, mm, "c")  # 10 GB of b are still on the GPU
            await settle()
            faulty.release("unload", "b", error=RuntimeError("the runtime will not let go"))
            await settle()
            faulty.release("unload", "b")  # the next attempt, if any, succeeds
            await settle()
            b_error = b.error
            tg.cancel_scope.cancel()  # c, if it still waits: b may be left behind for reconcile
    assert overcommits(faulty, BUDGET) == []
    assert isinstance(b_error, LoadFailed) and "died loading b" in str(b_error), b_error


async def test_a_rebalance_parks_what_the_planner_would_park() -> None:
    """``b`` measures 10 GB against a 6 GB estimate beside an idle 8 GB ``p`` with a warm
    tier: the planner makes room by parking ``p``, and the rebalance must do it, not
    leave the GPU 2 GB over its budget."""
    faulty = FaultyProvider()
    faulty.measure("b", {"cuda:0": gb(10)})
    async with faulty_manager(faulty, {"p": model(8, warm_tier=True), "b": model(6)}) as mm:
        await mm.load("p")
        await mm.load("b")
        await settle()  # the rebalance
        states = {e.name: e.state.value for e in mm.entries()}
    held = faulty.held().get("cuda:0", 0)
    assert held <= BUDGET["cuda:0"], f"the GPU holds {held / GB:g} GB on a 16 GB budget: {states}"


async def test_waking_a_model_found_asleep_reserves_what_it_measured_when_it_was_last_loaded() -> None:
    """``f`` (registry estimate 6 GB) measured 10 GB when this manager loaded it; unloaded,
    then found asleep (loaded and parked by someone else, its awake size not reported), its
    wake must reserve the 10 GB it measured, not the 6 GB estimate."""
    faulty = FaultyProvider()
    faulty.report_awake = False
    faulty.measure("f", {"cuda:0": gb(10)})
    async with faulty_manager(faulty, {"f": model(6), "b": model(8)}) as mm:
        await mm.load("f")
        await mm.unload("f")
        faulty.add_foreign("f", {"cuda:0": gb(10)}, tier=Tier.SLEEPING)
        await mm.reconcile()
        await settle()  # the adoption
        assert mm.is_parked("f")
        await wake_beside_a_load(mm, faulty, "f")  # 10 + 8 GB do not fit 16
    assert overcommits(faulty, BUDGET) == []
