"""A runtime known to be unreachable costs nothing healthy (issue 26, item 4): requests for
its models fail fast during a cool-down, evict nothing, and the outage is reported."""

from __future__ import annotations

from typing import Any

import pytest

from modelmora import ModelManager
from modelmora.errors import ProviderUnavailable, RuntimeUnreachable
from modelmora.memory import StaticProbe
from modelmora.testing.faulty import FaultyProvider

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def manager(healthy: FaultyProvider, down: FaultyProvider, clock: Clock, **config: Any) -> ModelManager:
    cfg: dict[str, Any] = {
        "budgets": {"cuda:0": "16GB"},
        "reaper_interval": 3600,
        "reconcile_interval": 3600,
        "outage_cooldown": 10,
        "outage_cooldown_max": 60,
        **config,
        "models": {
            "sim": {"provider": "faulty", "memory": "4GB", "group": "g"},
            "llm": {"provider": "down", "memory": "4GB", "group": "g"},
        },
    }
    return ModelManager(cfg, providers={"faulty": healthy, "down": down}, probe=StaticProbe({}), clock=clock)


def unreachable(down: FaultyProvider) -> None:
    """The one runtime behind ``down`` refuses connections (as Ollama's provider says it)."""
    for op in ("load", "observe"):
        down.fail_always(op, error=RuntimeUnreachable("cannot reach Ollama: [Errno 111] Connection refused"))  # type: ignore[arg-type]


async def test_an_outage_evicts_nothing_and_fails_fast_until_the_provider_heals() -> None:
    healthy, down, clock = FaultyProvider("faulty"), FaultyProvider("down"), Clock()
    async with manager(healthy, down, clock) as mm:
        await mm.load("sim")
        unreachable(down)
        with pytest.raises(ProviderUnavailable) as first:
            await mm.load("llm")
        assert "down" in str(first.value)
        assert mm.is_loaded("sim") and "sim" in healthy.instances  # the runtime's truth: kept
        assert not [c for c in healthy.calls if c.op == "unload"]

        calls = len(down.calls)
        clock.now += 1  # within the cool-down: answered at once, the runtime not asked
        with pytest.raises(ProviderUnavailable) as second:
            await mm.load("llm")
        assert len(down.calls) == calls
        retry_after = getattr(second.value, "retry_after", None)
        assert retry_after is not None and 0 < retry_after <= 10
        assert "sim" in healthy.instances

        outages = mm.outages()
        assert list(outages) == ["down"] and outages["down"]["since"] == 1000.0

        down.heal()
        clock.now += 60  # the cool-down has passed on the manager's clock
        await mm.load("llm")
        assert mm.is_loaded("llm") and "sim" not in healthy.instances  # evicted as usual
        assert mm.outages() == {}


async def test_the_back_off_doubles_while_the_provider_stays_down() -> None:
    healthy, down, clock = FaultyProvider("faulty"), FaultyProvider("down"), Clock()
    async with manager(healthy, down, clock) as mm:
        unreachable(down)
        waits = []
        for _ in range(4):
            with pytest.raises(ProviderUnavailable):
                await mm.load("llm")
            with pytest.raises(ProviderUnavailable) as fast:
                await mm.load("llm")
            waits.append(getattr(fast.value, "retry_after", None))
            clock.now += 61
        assert waits == [10, 20, 40, 60]
