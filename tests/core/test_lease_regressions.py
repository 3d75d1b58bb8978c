"""Issue 15, leases (failures 6-7): a leased model is never unloaded unless forced, and
nobody unloads a model on the strength of a guess about who loaded it."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from modelmora import ModelManager, ModelMoraError
from modelmora import events as ev
from modelmora.chain import Chain, Step
from modelmora.testing.faulty import FaultyProvider

from .support import Events, faulty_manager, hold, model, release_all, settle

pytestmark = pytest.mark.anyio


async def _unload(mm: ModelManager) -> Any:
    return await mm.unload("a")


async def _unload_all(mm: ModelManager) -> Any:
    return await mm.unload_all()


@pytest.mark.parametrize("unload", [_unload, _unload_all], ids=["unload", "unload_all"])
async def test_06_unload_without_force_leaves_a_model_leased_while_its_load_was_in_flight(
    unload: Any,
) -> None:
    faulty = FaultyProvider()
    faulty.hold("load", "a", times=1)
    async with faulty_manager(faulty, {"a": model(4)}) as mm:
        events = Events(mm)
        outcome: list[Any] = []

        async def unloader() -> None:
            try:
                outcome.append(await unload(mm))
            except ModelMoraError as exc:  # ModelInUse: a fine answer
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            first = anyio.CancelScope()  # a caller starts the load, then gives up:
            tg.start_soon(_load_in, first, mm)  # the load goes on with no lease on it
            await faulty.wait_pending("load", "a")
            first.cancel()
            await settle()
            assert mm.leases("a") == 0
            tg.start_soon(unloader)  # no lease now: waits for the load to settle, then unloads
            await settle()
            holder = hold(tg, mm, "a")  # ... but meanwhile someone leases it
            await settle()
            faulty.release("load", "a")
            await holder.granted.wait()
            await settle()
            closed = holder.handle is not None and holder.handle.closed
            await release_all(holder)
    unloads = events.of(ev.Unloading, "a")
    assert not closed and not any(c.op == "unload" for c in faulty.calls), (
        f"{unload.__name__.strip('_')}() without force unloaded 'a' under its holder "
        f"(events: {unloads}, unload answered {outcome})"
    )


async def _load_in(scope: anyio.CancelScope, mm: ModelManager) -> None:
    with scope:
        await mm.load("a")


async def test_07_a_chain_does_not_unload_a_model_another_caller_is_loading() -> None:
    faulty = FaultyProvider()
    faulty.hold("load", "m", times=1)
    async with faulty_manager(faulty, {"m": model(4)}) as mm:
        other_done = anyio.Event()

        async def other_caller() -> None:
            await mm.load("m", keep_alive=3600)  # wants m for an hour
            other_done.set()

        async def step(obj: Any, value: Any) -> str:
            await other_done.wait()
            return "ok"

        chain = Chain([Step(model="m", call=step)], manager=mm)
        results = []

        async def run_chain() -> None:
            results.append(await chain.run("x"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(other_caller)
            await faulty.wait_pending("load", "m")
            tg.start_soon(run_chain)  # the chain joins the load the other caller started
            await settle()
            assert mm.leases("m") == 2
            faulty.release("load", "m")
        assert results[0].ok, results[0]
        assert mm.is_loaded("m"), (
            f"the chain unloaded 'm', which another caller loaded with a 1 h keep-alive "
            f"(chain's clean-up: {results[0].steps[0].unloaded})"
        )


async def test_enter_now_takes_a_ready_model_and_never_waits_or_starts_a_load() -> None:
    """The proxy's hot path leases with ``enter_now``: a model that is not ready gets None with
    nothing started (the full path then loads it once, with its own errors), a ready one a
    lease like any other."""
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"a": model(4)}) as mm:
        cold = mm.use("a")
        assert cold.enter_now() is None
        assert mm.entries() == [] and [c for c in faulty.calls if c.op == "load"] == []
        await mm.load("a")
        lease = mm.use("a")
        handle = lease.enter_now()
        assert handle is not None and handle.name == "a" and mm.leases("a") == 1
        with pytest.raises(ModelMoraError):
            await mm.unload("a")
        await lease.__aexit__(None, None, None)
        assert mm.leases("a") == 0 and await mm.unload("a")
