"""An outage is the shared runtime's, never one model's server (issue 26, item 4): the
soak showed connection errors to single servers refusing every model of their provider."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from modelmora import ModelManager
from modelmora.errors import LoadFailed
from modelmora.memory import StaticProbe
from modelmora.testing.faulty import FaultyProvider

from .test_outage import Clock

pytestmark = pytest.mark.anyio


async def test_a_models_own_server_refusing_connections_is_no_outage() -> None:
    """A ``process`` or single ``llamacpp`` server is one model's: when it refuses
    connections, that model failed; the provider's other models still load (the outage
    the soak found too eager: a connection error to one server refused them all)."""
    provider, clock = FaultyProvider("faulty"), Clock()
    cfg: dict[str, Any] = {
        "budgets": {"cuda:0": "16GB"}, "reaper_interval": 3600, "reconcile_interval": 3600,
        "models": {"one": {"provider": "faulty", "memory": "4GB"}, "two": {"provider": "faulty", "memory": "4GB"}},
    }  # fmt: skip
    async with ModelManager(cfg, providers={"faulty": provider}, probe=StaticProbe({}), clock=clock) as mm:
        provider.fail_next("load", "one", httpx.ConnectError("[Errno 111] Connection refused"))  # type: ignore[arg-type]
        with pytest.raises(LoadFailed):
            await mm.load("one")
        assert mm.outages() == {}
        await mm.load("two")
        assert mm.is_loaded("two")
