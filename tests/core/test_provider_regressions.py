"""Issue 15, providers (failures 15-18), each on the real provider: vLLM with its HTTP
stubbed (httpx.MockTransport), the torch provider's isolated worker, and the process
provider with a tiny real server."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelmora import Handle, LoadFailed, ModelManager, ModelSpec, SyncModelManager
from modelmora.chain import Chain, Step
from modelmora.memory import StaticProbe
from modelmora.providers.base import Observed
from modelmora.providers.torch import TorchProvider, TorchSettings
from modelmora.providers.vllm import VLLMProvider, VLLMSettings

TINY_SERVER = Path(__file__).with_name("tiny_server.py")
NO_BACKGROUND = {"reaper_interval": 3600, "reconcile_interval": 3600}


# -- 15. vLLM sleep_level: 2 sends level=1 -----------------------------------------------------


class OfflineVLLM(VLLMProvider):
    """The vLLM provider with its Docker side stubbed out: a container is "up" at once.
    Its HTTP side (sleep, wake) is the real code, over a mock transport."""

    async def load(self, spec: ModelSpec) -> Handle:
        return self._handle(spec, "container-1")

    async def unload(self, handle: Handle) -> dict[str, int]:
        handle.close()
        return dict(handle.memory)

    async def observe(self) -> list[Observed]:
        return []


@pytest.mark.anyio
async def test_15_vllm_sleeps_at_the_configured_level() -> None:
    requests: list[httpx.Request] = []

    def vllm(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={})

    provider = OfflineVLLM("vllm", VLLMSettings(sleep_level=2))  # weights discarded when asleep
    await provider._http.aclose()
    provider._http = httpx.AsyncClient(transport=httpx.MockTransport(vllm))
    spec = {"provider": "vllm", "target": "Qwen/Qwen2.5-14B-Instruct", "memory": "10GB", "warm_tier": True,
            "options": {"port": 8000}}  # fmt: skip
    async with ModelManager(
        {"budgets": {"cuda:0": "16GB"}, **NO_BACKGROUND, "models": {"qwen": spec}},
        providers={"vllm": provider},
        probe=StaticProbe({}),
    ) as mm:
        await mm.load("qwen")
        assert await mm.park("qwen")
        await mm.unload("qwen")
    await provider._http.aclose()
    levels = [r.url.params.get("level") for r in requests if r.url.path == "/sleep"]
    assert levels == ["2"], f"providers.vllm.sleep_level is 2, but vLLM was asked for /sleep?level={levels}"


# -- 16. a worker start timeout is reported as the load timeout --------------------------------


@pytest.mark.anyio
async def test_16_a_worker_start_timeout_names_the_limit_that_fired() -> None:
    provider = TorchProvider("torch", TorchSettings(worker_start_timeout=0.5, worker_stop_grace=0.5))
    spec = {
        "provider": "torch", "target": "signal:pause", "device": "cpu", "memory": "1MB",  # never returns
        "options": {"kind": "factory", "isolation": "process"},
    }  # fmt: skip
    async with (
        provider,
        ModelManager(
            {"budgets": {"cpu": "1GB"}, **NO_BACKGROUND, "models": {"w": spec}},
            providers={"torch": provider},
            probe=StaticProbe({}),
        ) as mm,
    ):
        with pytest.raises(LoadFailed) as failure:
            await mm.load("w")
    message = str(failure.value)
    assert "load_timeout" not in message, message
    assert any(s in message for s in ("worker_start_timeout", "500ms", "0.5s")), message


# -- 17. leaving and re-entering a manager -----------------------------------------------------


def test_17_a_manager_can_be_entered_again(tmp_path: Path) -> None:
    config = {
        "budgets": {"cpu": "4GB"},
        "providers": {"process": {"state_dir": str(tmp_path), "poll_interval": 0.02, "stop_grace": 2}},
        **NO_BACKGROUND,
        "models": {
            "tiny": {
                "provider": "process", "target": "tiny", "device": "cpu", "memory": "50MB",
                "options": {"command": [sys.executable, str(TINY_SERVER), "${PORT}"], "health": "/health"},
            }
        },
    }  # fmt: skip
    manager = SyncModelManager(config, probe=StaticProbe({}))
    with manager as mm:
        mm.load("tiny")
        mm.unload("tiny")
    with manager as mm:
        try:
            mm.load("tiny")  # the provider's HTTP client was closed when the manager was left
        finally:
            mm.unload_all(force=True)


# -- 18. chain steps and isolated torch models -------------------------------------------------


@pytest.mark.anyio
async def test_18_a_chain_step_gets_the_handle_of_an_isolated_model_whatever_its_parameter_is_called() -> (
    None
):
    spec = {
        "provider": "torch", "target": "builtins:str", "device": "cpu", "memory": "1MB",
        "options": {"kind": "factory", "isolation": "process", "kwargs": {"object": "hello"}},
    }  # fmt: skip

    async def shout(model: Any, text: Any) -> Any:  # first parameter not named `handle`
        return await model.call("upper")

    async with (
        TorchProvider() as provider,  # injected: closing it (and its fork server) is ours to do
        ModelManager(
            {"budgets": {"cpu": "4GB"}, **NO_BACKGROUND, "models": {"w": spec}},
            providers={"torch": provider},
            probe=StaticProbe({}),
        ) as mm,
    ):
        result = await Chain([Step(model="w", call=shout)], manager=mm).run("x")
        await mm.unload_all(force=True)
    assert result.ok, result.steps[0].error
    assert result.output == "HELLO"
