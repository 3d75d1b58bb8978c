"""Review of issue 22's core rework: each test names what it checks and the message it
failed with before its fix."""

from __future__ import annotations

import anyio
import pytest

from modelmora import ModelMoraError
from modelmora.testing.faulty import FaultyProvider

from .support import GB, faulty_manager, model

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
