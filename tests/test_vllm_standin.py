"""The vLLM stand-in behaves like vLLM 0.11 where modelmora depends on it (sleep levels,
the level-2 weight reload, crashes of a busy or sleeping engine), and the vLLM provider's
sleep/wake survive that behaviour.  Over HTTP on loopback, without Docker: the provider's
sleep and wake only talk to the server's endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import stream_in_background, wait_for

from modelmora import LoadFailed
from modelmora.errors import ProviderError
from modelmora.net import free_port
from modelmora.providers.base import Handle
from modelmora.providers.vllm import VLLMProvider, VLLMSettings
from modelmora.spec import ModelSpec
from modelmora.testing.threaded import ThreadedServer
from modelmora.testing.vllm import EngineState, build_app

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
Start = Callable[..., tuple[EngineState, str]]


@pytest.fixture
def standin() -> Iterator[Start]:
    servers: list[ThreadedServer] = []

    def start(**kwargs: Any) -> tuple[EngineState, str]:
        state = EngineState(
            model="Qwen/Qwen2.5-0.5B", served="qwen", max_model_len=4096, sleep_mode=True, **kwargs
        )
        server = ThreadedServer(build_app(state, dev_mode=True), lifespan="off").start(timeout=10)
        servers.append(server)
        return state, server.url

    yield start
    for server in servers:
        server.stop()


def complete(url: str, prompt: str = "are you awake") -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "qwen", "prompt": prompt}, timeout=30)


def completing(url: str) -> threading.Thread:
    body = {"model": "qwen", "prompt": " ".join(["w"] * 15), "stream": True}
    return stream_in_background(f"{url}/v1/completions", body)


# -- the stand-in itself ---------------------------------------------------------------------


def test_level_2_discards_the_weights_until_they_are_reloaded(standin: Start) -> None:
    """docs/features/sleep_mode.md: level 2 forgets the weights; the documented wake is
    wake_up?tags=weights, POST /collective_rpc {"method": "reload_weights"},
    wake_up?tags=kv_cache (vllm/entrypoints/openai/api_server.py, dev-mode routes)."""
    _, url = standin()
    assert complete(url).json()["choices"][0]["text"] == "Echo: are you awake"
    assert httpx.post(f"{url}/sleep", params={"level": 2}).status_code == 200
    assert httpx.post(f"{url}/wake_up").status_code == 200
    assert "are you awake" not in complete(url).json()["choices"][0]["text"]  # garbage weights
    httpx.post(f"{url}/sleep", params={"level": 2})
    httpx.post(f"{url}/wake_up", params={"tags": "weights"})
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}  # kv_cache still asleep
    reloaded = httpx.post(f"{url}/collective_rpc", json={"method": "reload_weights"})
    assert reloaded.status_code == 200 and reloaded.json() == {"results": [None]}
    httpx.post(f"{url}/wake_up", params={"tags": "kv_cache"})
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False}
    assert complete(url).json()["choices"][0]["text"] == "Echo: are you awake"
    httpx.post(f"{url}/sleep", params={"level": 1})
    httpx.post(f"{url}/wake_up")
    assert complete(url).json()["choices"][0]["text"] == "Echo: are you awake"  # level 1 keeps them


def test_a_request_to_a_sleeping_engine_kills_it(standin: Start) -> None:
    """vLLM 0.11: a batch reaching an engine whose memory is asleep fails the engine core;
    /health (check_health → EngineDeadError) answers 503 from then on."""
    deaths: list[str] = []
    state, url = standin()
    state.on_death = lambda: deaths.append(str(state.dead))
    httpx.post(f"{url}/sleep", params={"level": 1})
    assert httpx.get(f"{url}/health").status_code == 200  # asleep is not dead
    assert complete(url).status_code == 500
    assert httpx.get(f"{url}/health").status_code == 503 and deaths == ["a request reached a sleeping engine"]
    assert httpx.post(f"{url}/wake_up").status_code == 500


def test_sleeping_with_a_request_in_flight_answers_200_and_kills_the_engine(standin: Start) -> None:
    """vLLM 0.11's /sleep frees the memory under a running batch and still answers 200;
    /metrics vllm:num_requests_running showed the request."""
    state, url = standin(token_delay=0.05)
    thread = completing(url)
    wait_for(
        lambda: (
            'vllm:num_requests_running{engine="0",model_name="qwen"} 1.0' in httpx.get(f"{url}/metrics").text
        )
    )
    assert httpx.post(f"{url}/sleep", params={"level": 1}).status_code == 200
    thread.join()
    assert httpx.get(f"{url}/health").status_code == 503 and state.dead is not None


def test_the_process_exits_when_its_engine_dies(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VLLM_SERVER_DEV_MODE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "modelmora.testing.vllm",
        "--model",
        "m",
        "--port",
        str(port),
        "--enable-sleep-mode",
    ]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: _up(url), timeout=30)
            httpx.post(f"{url}/sleep", params={"level": 1})
            assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}).status_code == 500
            assert proc.wait(timeout=10) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None and "engine dead" in proc.stdout.read()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False


# -- the provider against it -------------------------------------------------------------------


def provider(**settings: Any) -> VLLMProvider:
    return VLLMProvider("vllm", VLLMSettings(poll_interval=0.02, **settings))


def handle_for(url: str) -> Handle:
    port = int(url.rsplit(":", 1)[1])
    spec = ModelSpec(name="qwen", provider="vllm", target="Qwen/Qwen2.5-0.5B", memory="10GB", warm_tier=True,
                     options={"port": port})  # fmt: skip
    return Handle(spec=spec, provider="vllm", endpoint=url, api="openai", memory={"cuda:0": 10 * 10**9},
                  runtime="container-id", served_name="qwen")  # fmt: skip


async def aget(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.get(url)


async def acomplete(url: str, prompt: str = "are you awake") -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(f"{url}/v1/completions", json={"model": "qwen", "prompt": prompt})


@pytest.mark.anyio
async def test_wake_after_level_2_reloads_the_weights(standin: Start) -> None:
    _, url = standin()
    async with provider() as p:
        handle = handle_for(url)
        await p.sleep(handle, 2)
        await p.wake(handle)
    assert (await aget(f"{url}/is_sleeping")).json() == {"is_sleeping": False}
    assert (await acomplete(url)).json()["choices"][0]["text"] == "Echo: are you awake"  # not garbage


@pytest.mark.anyio
async def test_sleep_waits_for_requests_in_flight_instead_of_crashing_the_engine(standin: Start) -> None:
    state, url = standin(token_delay=0.05)
    thread = completing(url)
    wait_for(lambda: state.running == 1)
    async with provider() as p:
        await p.sleep(handle_for(url), 1)
    thread.join()
    assert state.dead is None and (await aget(f"{url}/health")).status_code == 200
    assert (await aget(f"{url}/is_sleeping")).json() == {"is_sleeping": True}


@pytest.mark.anyio
async def test_sleep_refuses_an_engine_that_stays_busy(standin: Start) -> None:
    state, url = standin(token_delay=0.1)
    thread = completing(url)
    wait_for(lambda: state.running == 1)
    async with provider(drain_timeout=0.2) as p:
        with pytest.raises(ProviderError, match="in flight"):
            await p.sleep(handle_for(url), 1)
    assert state.dead is None and not state.sleeping
    thread.join()


@pytest.mark.anyio
async def test_a_dead_engine_is_reported_lost_and_not_woken(standin: Start) -> None:
    state, url = standin()
    lost: list[str] = []
    async with provider() as p:
        p.bind(lambda handle, why: lost.append(why))
        handle = handle_for(url)
        await p.sleep(handle, 1)
        await acomplete(url)  # somebody sent a request to the sleeping engine: it died
        with pytest.raises(LoadFailed, match="dead"):
            await p.wake(handle)
    assert state.dead is not None and len(lost) == 1 and "dead" in lost[0]


@pytest.mark.anyio
async def test_a_sleeping_engine_still_holds_gpu_memory(standin: Start) -> None:
    """The CUDA context and graphs stay on the GPU (vLLM frees its weight and KV-cache pool
    only): without NVML, sleep_gpu_allowance (1 GiB) stays counted on the device."""
    _, url = standin()
    async with provider() as p:
        handle = handle_for(url)
        assert await p.sleep(handle, 1) == {"cuda:0": GIB, "cpu": 10 * 10**9}  # weights in host RAM
        await p.wake(handle)
        assert await p.sleep(handle, 2) == {"cuda:0": GIB, "cpu": 0}  # weights discarded
        await p.wake(handle)
    async with provider(sleep_gpu_allowance="512MiB") as p:
        assert (await p.sleep(handle, 1))["cuda:0"] == 512 * 1024**2


# -- the same against a real vLLM, where one runs ---------------------------------------------


@pytest.mark.gpu
@pytest.mark.anyio
async def test_wake_after_level_2_on_a_real_vllm() -> None:
    """VLLM_TEST_URL: a vLLM started with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1
    (VLLM_TEST_MODEL: its served name).  Greedy completions before a level-2 sleep and after
    the provider's wake must agree: the weights were reloaded, not left as garbage."""
    url = os.environ.get("VLLM_TEST_URL")
    if not url:
        pytest.skip("VLLM_TEST_URL not set: no real vLLM server to test against")
    served = os.environ.get("VLLM_TEST_MODEL", "")
    body = {"model": served, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    async with httpx.AsyncClient(timeout=300) as http:
        before = (await http.post(f"{url}/v1/completions", json=body)).json()["choices"][0]["text"]
        async with provider() as p:
            handle = handle_for(url)
            held = await p.sleep(handle, 2)
            assert held["cuda:0"] > 0 and held["cpu"] == 0
            await p.wake(handle)
        after = (await http.post(f"{url}/v1/completions", json=body)).json()["choices"][0]["text"]
    assert after == before
