"""The Ollama provider against the emulator, over real HTTP on loopback."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from modelmora import InsufficientMemory, ModelManager, ModelNotFound, ProviderUnavailable
from modelmora import events as ev
from modelmora.memory import StaticProbe
from modelmora.providers.ollama import OllamaProvider, OllamaSettings, map_error
from modelmora.spec import ModelSpec
from modelmora.testing.ollama import OllamaEmulator

pytestmark = pytest.mark.anyio
Start = Callable[..., OllamaEmulator]
GB = 10**9
ROOT = Path(__file__).resolve().parents[1]


def provider(emu: OllamaEmulator, **settings: Any) -> OllamaProvider:
    return OllamaProvider("ollama", OllamaSettings(base_url=emu.url, retry_initial=0.05, **settings))


def spec(target: str, **kw: Any) -> ModelSpec:
    return ModelSpec(name=kw.pop("name", target), provider="ollama", target=target, **kw)


async def test_load_observe_unload(make_ollama: Start) -> None:
    emu = make_ollama(unload_delay=0.3)
    async with provider(emu) as p:
        handle = await p.load(spec("qwen2.5:14b"))
        assert (handle.endpoint, handle.api) == (emu.url, "ollama")
        assert handle.memory == {"cuda:0": 9 * GB}
        [seen] = await p.observe()
        assert seen.target == "qwen2.5:14b" and seen.memory == {"cuda:0": 9 * GB}
        assert seen.details["context_length"] == 2048
        freed = await p.unload(handle)
        # Ollama answered at once but listed the model for 0.3 s more: unload waited for /api/ps
        assert freed == {"cuda:0": 9 * GB} and emu.loaded() == [] and handle.closed


async def test_embedding_models_load_through_embed(make_ollama: Start) -> None:
    emu = make_ollama()
    async with provider(emu) as p:
        handle = await p.load(spec("nomic-embed-text", options={"kind": "embedding"}))
        assert emu.loaded() == ["nomic-embed-text"]
        await p.unload(handle)
        assert emu.loaded() == []


async def test_never_forever_keep_alive_for_owned_models(make_ollama: Start) -> None:
    emu = make_ollama()
    async with provider(emu, hold=120, margin=30) as p:
        h = await p.load(spec("qwen2.5:14b", keep_alive=-1))
        await p.refresh(h, math.inf)
        await p.refresh(h, 10)
        pinned = await p.load(spec("mistral-small:22b", pinned=True))
        assert emu.stats.keep_alives == [150, 150, 40, 150]
        async with provider(emu, pin_forever=True) as p2:
            await p2.refresh(pinned, math.inf)
        assert emu.stats.keep_alives[-1] == -1


async def test_preload_uses_the_runner_options_so_later_requests_do_not_reload(make_ollama: Start) -> None:
    emu = make_ollama()
    async with provider(emu) as p:
        await p.load(spec("qwen2.5:14b", options={"num_ctx": 8192}))
        async with httpx.AsyncClient() as client:
            await client.post(
                f"{emu.url}/api/generate",
                json={"model": "qwen2.5:14b", "prompt": "hi", "stream": False, "options": {"num_ctx": 8192}},
            )
        assert emu.stats.reloads == 0 and emu.stats.loads == 1


async def test_retries_on_busy_and_refused_connections(make_ollama: Start) -> None:
    emu = make_ollama()
    async with provider(emu) as p:
        emu.busy(2)
        before = emu.stats.requests
        assert await p.observe() == []
        assert emu.stats.requests - before == 3  # two 503s, then success

        async def restart_later() -> None:
            await anyio.to_thread.run_sync(time.sleep, 0.3)
            emu.start()

        emu.stop()
        async with anyio.create_task_group() as tg:
            tg.start_soon(restart_later)
            assert await p.observe() == []  # refused, refused, ..., then answered
        emu.busy(10)
        with pytest.raises(ProviderUnavailable, match="busy"):
            await p.observe()  # attempts run out: a clear error


async def test_no_retry_on_404(make_ollama: Start) -> None:
    emu = make_ollama()
    async with provider(emu) as p:
        before = emu.stats.requests
        with pytest.raises(ModelNotFound, match="ollama pull llama9:404b"):
            await p.load(spec("llama9:404b"))
        assert emu.stats.requests - before <= 2  # the load, and the clean-up of a failed load


async def test_out_of_memory_is_insufficient_memory_with_the_servers_words(make_ollama: Start) -> None:
    emu = make_ollama()
    emu.oom_next("qwen2.5:14b")
    async with provider(emu) as p:
        with pytest.raises(InsufficientMemory, match="cudaMalloc failed: out of memory"):
            await p.load(spec("qwen2.5:14b"))
        assert emu.loaded() == []


def test_every_foreign_error_is_mapped() -> None:
    url, req = "http://x", httpx.Request("GET", "http://x/api/ps")
    cases: list[tuple[BaseException | httpx.Response, type[Exception]]] = [
        (httpx.ConnectError("refused", request=req), ProviderUnavailable),
        (httpx.ReadTimeout("slow", request=req), ProviderUnavailable),
        (httpx.RemoteProtocolError("eof", request=req), ProviderUnavailable),
        (httpx.Response(503, json={"error": "server busy"}, request=req), ProviderUnavailable),
        (httpx.Response(404, json={"error": "model 'x' not found"}, request=req), ModelNotFound),
        (
            httpx.Response(
                500,
                json={"error": "model requires more system memory (32 GiB) than is available"},
                request=req,
            ),
            InsufficientMemory,
        ),
        (
            httpx.Response(500, json={"error": "model runner has unexpectedly stopped"}, request=req),
            InsufficientMemory,
        ),
        (httpx.Response(400, text="not json", request=req), Exception),
        (ValueError("odd"), Exception),
    ]
    from modelmora import ModelMoraError, TransientError

    for exc, kind in cases:
        mapped = map_error(exc, model="x", provider="ollama", url=url)
        assert isinstance(mapped, ModelMoraError) and isinstance(mapped, kind), (exc, mapped)
        assert isinstance(mapped, TransientError) == (kind is ProviderUnavailable)
        assert "\n" not in str(mapped)


async def test_context_optimisation_grows_the_estimate(make_ollama: Start) -> None:
    emu = make_ollama()
    async with provider(emu, max_context=16384) as p:
        s = spec("qwen2.5:14b", memory="9GB", options={"optimize_context": True, "max_memory": "11GB"})
        prepared = await p.prepare(s)
        # 32 layers x 8 kv heads x 128 dims x 2 (K,V) x 2 bytes = 131072 bytes per token
        room = (11 - 9) * GB // 131072
        assert prepared.options["num_ctx"] == min(8192, 16384, (2048 + room) // 256 * 256)
        assert prepared.memory["cuda:0"] == 9 * GB + (prepared.options["num_ctx"] - 2048) * 131072
        await p.load(prepared)
        [seen] = await p.observe()
        assert seen.details["context_length"] == prepared.options["num_ctx"]


def config(emu: OllamaEmulator, models: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "providers": {"ollama": {"base_url": emu.url, "retry_initial": 0.05}},
        "budgets": {"cuda:0": "24GB", "cpu": "64GB"},
        "models": {n: {"provider": "ollama", **m} for n, m in models.items()},
        **extra,
    }


async def test_manager_adopts_and_reconciles(make_ollama: Start) -> None:
    emu = make_ollama()
    async with httpx.AsyncClient() as client:
        await client.post(f"{emu.url}/api/generate", json={"model": "mistral-small:22b"})
    cfg = config(emu, {"qwen": {"target": "qwen2.5:14b", "memory": "9GB"}})
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        assert mm.loaded() == ["ollama/mistral-small:22b"]
        status = {m.name: m for m in (await mm.status()).models}
        assert not status["ollama/mistral-small:22b"].owned
        async with mm.use("qwen") as handle:
            assert handle.endpoint == emu.url
        emu.evict("qwen2.5:14b")  # Ollama let it go on its own
        await mm.reconcile()
        assert mm.loaded() == ["ollama/mistral-small:22b"]
        assert await mm.unload("ollama/mistral-small:22b")
        assert emu.loaded() == []


async def test_seed_workflow_on_a_24gb_card(make_ollama: Start) -> None:
    """mistral-small:22b → deepseek-r1:70b → mistral-small:22b: never two large models at once."""
    emu = make_ollama(models={"mistral-small:22b": "13GB", "deepseek-r1:70b": "42GB"}, vram="24GB")
    cfg = config(
        emu,
        {
            "mistral-small": {"target": "mistral-small:22b", "memory": "13GB", "group": "large"},
            "deepseek-r1": {
                "target": "deepseek-r1:70b",
                "memory": {"cuda:0": "24GB", "cpu": "18GB"},
                "group": "large",
            },
        },
    )
    resident_sets: list[list[str]] = []
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        mm.events.subscribe(
            lambda e: resident_sets.append(emu.loaded()) if isinstance(e, ev.Loaded) else None
        )
        for name in ("mistral-small", "deepseek-r1", "mistral-small"):
            async with mm.use(name) as handle:
                async with httpx.AsyncClient() as client:
                    r = await client.post(
                        f"{handle.endpoint}/api/generate",
                        json={"model": handle.target, "prompt": "analyse", "stream": False},
                    )
                assert r.json()["done"]
                assert len(emu.loaded()) == 1
        await mm.unload_all()
    assert resident_sets == [["mistral-small:22b"], ["deepseek-r1:70b"], ["mistral-small:22b"]]
    assert emu.loaded() == [] and emu.stats.loads == 3


async def test_two_hosts_with_their_own_budgets(make_ollama: Start) -> None:
    a, b = make_ollama(vram="16GB"), make_ollama(vram="24GB")
    cfg = {
        "providers": {"box-a": {"type": "ollama", "base_url": a.url, "device": "box-a:cuda:0"},
                      "box-b": {"type": "ollama", "base_url": b.url, "device": "box-b:cuda:0"}},
        "budgets": {"box-a:cuda:0": "16GB", "box-b:cuda:0": "24GB"},
        "models": {
            "mistral-a": {"provider": "box-a", "target": "mistral-small:22b", "device": "box-a:cuda:0", "memory": "13GB"},
            "qwen-a": {"provider": "box-a", "target": "qwen2.5:14b", "device": "box-a:cuda:0", "memory": "9GB"},
            "mistral-b": {"provider": "box-b", "target": "mistral-small:22b", "device": "box-b:cuda:0", "memory": "13GB"},
            "qwen-b": {"provider": "box-b", "target": "qwen2.5:14b", "device": "box-b:cuda:0", "memory": "9GB"},
        },
    }  # fmt: skip
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        for name in ("mistral-a", "mistral-b", "qwen-b", "qwen-a"):
            await mm.load(name)
        assert a.loaded() == ["qwen2.5:14b"]  # 13 + 9 > 16 GB on box A: mistral made room
        assert sorted(b.loaded()) == ["mistral-small:22b", "qwen2.5:14b"]  # 22 GB fit on box B
        assert mm.usage() == {"box-a:cuda:0": 9 * GB, "box-b:cuda:0": 22 * GB}


DEAD_MANS_SCRIPT = textwrap.dedent(
    """
    import anyio, sys
    from modelmora import ModelManager
    from modelmora.memory import StaticProbe

    async def main(url):
        cfg = {"providers": {"ollama": {"base_url": url, "hold": 1.0, "margin": 0.5}},
               "models": {"m": {"provider": "ollama", "target": "qwen2.5:14b", "keep_alive": -1}}}
        async with ModelManager(cfg, probe=StaticProbe({})) as mm:
            await mm.load("m")
            print("loaded", flush=True)
            await anyio.sleep_forever()

    anyio.run(main, sys.argv[1])
    """
)


def test_dead_mans_switch_frees_vram_when_the_manager_dies(make_ollama: Start) -> None:
    emu = make_ollama()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with subprocess.Popen(
        [sys.executable, "-c", DEAD_MANS_SCRIPT, emu.url], stdout=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "loaded"
            assert emu.loaded() == ["qwen2.5:14b"]
        finally:
            proc.send_signal(signal.SIGKILL)  # the manager dies without unloading anything
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while emu.loaded() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert emu.loaded() == []  # Ollama's own timer, not the dead manager, freed it
        assert -1 not in emu.stats.keep_alives and "-1" not in emu.stats.keep_alives


async def test_a_load_given_up_on_is_unloaded_when_ollama_finishes_it(make_ollama: Start) -> None:
    # Found by the long soak on the emulator: a load is given up on (timeout, cancellation),
    # the keep_alive: 0 sent on the way out is lost (here: Ollama answers it 503), and Ollama
    # finishes the load anyway.  The next observe() must let go of that model rather than
    # offer it for adoption as somebody else's.
    emu = make_ollama(load_delay=0.6)
    async with provider(emu, retries=1) as p:
        async with anyio.create_task_group() as tg:

            async def busy_soon() -> None:
                await anyio.sleep(0.1)
                emu.busy(1)  # the next request, the clean-up unload, is refused

            tg.start_soon(busy_soon)
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.25):
                    await p.load(spec("qwen2.5:14b"))
        with anyio.fail_after(5):
            while "qwen2.5:14b" not in emu.loaded():  # Ollama finishes the load anyway
                await anyio.sleep(0.05)
        assert await p.observe() == []  # not offered for adoption: this provider gave up on it
        with anyio.fail_after(5):
            while emu.loaded():
                await anyio.sleep(0.05)
