"""The provider checks against a real Ollama server, when one is reachable at $OLLAMA_HOST.

Set OLLAMA_HOST (e.g. 127.0.0.1:11434) and optionally OLLAMA_TEST_MODEL (a small pulled
model, default: the smallest one /api/tags lists).  Without OLLAMA_HOST these are skipped,
with that reason shown.
"""

from __future__ import annotations

import os

import httpx
import pytest

from modelmora import ModelNotFound
from modelmora.providers.ollama import OllamaProvider, OllamaSettings
from modelmora.spec import ModelSpec

pytestmark = [pytest.mark.anyio, pytest.mark.live_ollama]


@pytest.fixture
def live() -> tuple[str, str]:
    host = os.environ.get("OLLAMA_HOST")
    if not host:
        pytest.skip("OLLAMA_HOST not set: no real Ollama server to test against")
    url = host if host.startswith("http") else f"http://{host}"
    model = os.environ.get("OLLAMA_TEST_MODEL")
    if not model:
        tags = httpx.get(f"{url}/api/tags", timeout=10).json().get("models") or []
        if not tags:
            pytest.skip(f"OLLAMA_HOST={host} has no pulled model to test with")
        model = min(tags, key=lambda m: m.get("size", 0))["name"]
    return url, str(model)


async def test_live_load_observe_unload(live: tuple[str, str]) -> None:
    url, model = live
    async with OllamaProvider("ollama", OllamaSettings(base_url=url)) as p:
        handle = await p.load(ModelSpec(name="live", provider="ollama", target=model))
        assert sum(handle.memory.values()) > 0
        assert any(o.target == model for o in await p.observe())
        await p.unload(handle)
        assert all(o.target != model for o in await p.observe())


async def test_live_missing_model(live: tuple[str, str]) -> None:
    url, _ = live
    async with OllamaProvider("ollama", OllamaSettings(base_url=url)) as p:
        with pytest.raises(ModelNotFound):
            await p.load(ModelSpec(name="x", provider="ollama", target="modelmora-does-not-exist:404"))
