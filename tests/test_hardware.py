"""Budgets from what the devices have, ``devices:`` restriction, and the hardware inventory
(``ModelManager.hardware()``, ``GET /hardware``, ``modelmora status --hardware``), on
simulated GPUs: this machine has no NVML."""

from __future__ import annotations

import pytest

from modelmora import ModelManager
from modelmora.memory import StaticProbe

GB = 10**9
GiB = 1 << 30


@pytest.mark.anyio
async def test_a_gpu_without_a_budget_keeps_one_gib_free_by_default() -> None:
    """Like llama.cpp's ``--fit``: with no ``reserve`` configured, 1 GiB of each GPU stays
    out of an automatic budget (CUDA context, the desktop, other runtimes' allocations)."""
    async with ModelManager({}, probe=StaticProbe({"cuda:0": 24 * GB, "cuda:1": 12 * GB})) as mm:
        assert mm.budgets == {"cuda:0": 24 * GB - GiB, "cuda:1": 12 * GB - GiB}
