"""Review of issue 22's core rework: each test names what it checks and the message it
failed with before its fix."""

from __future__ import annotations

import anyio
import pytest

from modelmora import ModelMoraError
from modelmora.testing.faulty import FaultyProvider

from .support import GB, faulty_manager, hold, model, settle

pytestmark = pytest.mark.anyio


async def test_01_an_unknown_size_reservation_is_not_kept_after_its_admission_starts_over() -> None:
    """``u`` has no size: its admission evicts the idle ``a`` and reserves the whole
    16 GB GPU.  While ``a`` unloads another process takes 1 GB, so the admission decides
    again: a fresh load of ``u`` would reserve the 15 GB now free.  The headroom it
    reserved before is not a size ``u`` needs."""
    faulty = FaultyProvider(devices={"cuda:0": 16 * GB})
    unknown = {"provider": "faulty", "options": {"actual_memory": {"cuda:0": 4 * GB}}}
    models = {"a": model(16), "u": unknown}
    async with faulty_manager(faulty, models, probe=faulty.probe) as mm:
        await mm.load("a")
        faulty.hold("unload", "a", times=1)
        outcome: list[BaseException | str] = []

        async def load_u() -> None:
            try:
                await mm.load("u")
                outcome.append("loaded")
            except ModelMoraError as exc:
                outcome.append(exc)

        with anyio.fail_after(10):  # a hang detector
            async with anyio.create_task_group() as tg:
                tg.start_soon(load_u)
                await faulty.wait_pending("unload", "a")
                faulty.external["cuda:0"] = 1 * GB  # another process, while a unloads
                faulty.release("unload", "a")
    assert outcome == ["loaded"], f"load('u') with 15 GB free: {outcome}"


async def _first(*events: anyio.Event) -> None:
    """Until one of ``events`` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


async def test_02_a_failing_park_of_a_model_whose_queued_callers_yield_is_not_retried_in_a_loop() -> None:
    """``b`` waits for the memory of a leased ``a`` (``lease_bypass_limit: 0``), and a
    caller queues at ``a``'s gate behind ``b``.  Once ``a``'s holder leaves, ``b``'s
    admission may park ``a`` (the queued caller yields to it); the runtime cannot park.
    ``finish_park`` then keeps ``a`` ready "because a caller waits for it" — the very
    caller that yields to ``b`` — and reports no failure, so the admission plans the same
    park again at once, and again, until its wait_timeout."""
    faulty = FaultyProvider()
    models = {"a": model(10, warm_tier=True), "b": model(10)}
    budgets = {"cuda:0": "16GB", "cpu": "64GB"}
    async with faulty_manager(faulty, models, budgets=budgets, lease_bypass_limit=0, wait_timeout=5) as mm:
        lease = mm.use("a")
        await lease.__aenter__()
        async with anyio.create_task_group() as tg:
            b = hold(tg, mm, "b")  # waits for a's memory: a is leased
            await settle()
            queued = hold(tg, mm, "a")  # queues behind b
            await settle()
            faulty.fail_always("sleep", "a", RuntimeError("the warm tier is broken"))
            lease.release()
            with anyio.fail_after(20):  # a hang detector
                await _first(b.granted, b.done)
            parks = len([c for c in faulty.calls if c.op == "sleep"])
            tg.cancel_scope.cancel()
    assert parks <= 2, f"the park of a was tried {parks} times; b: {b}, queued caller: {queued}"
