"""The Ollama provider over real HTTP on loopback: against the emulator in its strict
(real-like) mode, and — for the tests taking the ``server`` fixture — against a real
Ollama as well when ``OLLAMA_HOST`` is set (``-m live_ollama``; optional
``OLLAMA_TEST_MODEL`` and ``OLLAMA_TEST_EMBED_MODEL``, default: the smallest pulled model
of each kind)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from modelmora import InsufficientMemory, ModelManager, ModelNotFound, ProviderUnavailable, UnloadFailed
from modelmora import events as ev
from modelmora.memory import StaticProbe
from modelmora.providers.base import Handle
from modelmora.providers.ollama import OllamaProvider, OllamaSettings, map_error
from modelmora.spec import ModelSpec
from modelmora.testing.ollama import MIB, OllamaEmulator

pytestmark = pytest.mark.anyio
OLLAMA_STRICT = True  # the make_ollama fixture gives this suite the real-like emulator
Start = Callable[..., OllamaEmulator]
GB = 10**9
KV = 131072  # the emulated architecture: 32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes
ROOT = Path(__file__).resolve().parents[1]


def provider(emu: OllamaEmulator | str, **settings: Any) -> OllamaProvider:
    url = emu if isinstance(emu, str) else emu.url
    return OllamaProvider("ollama", OllamaSettings(base_url=url, retry_initial=0.05, **settings))


def spec(target: str, **kw: Any) -> ModelSpec:
    return ModelSpec(name=kw.pop("name", target), provider="ollama", target=target, **kw)


@dataclass
class Server:
    """An Ollama to test against: the emulator (``emu``), or a real one (``emu`` None)."""

    url: str
    llm: str
    embed: str | None
    emu: OllamaEmulator | None = None


def _live_models(url: str) -> tuple[str, str | None]:
    tags = httpx.get(f"{url}/api/tags", timeout=10).json().get("models") or []
    kinds: dict[str, list[tuple[int, str]]] = {"completion": [], "embedding": []}
    for m in tags:
        caps = (
            httpx.post(f"{url}/api/show", json={"model": m["name"]}, timeout=30).json().get("capabilities")
            or []
        )
        kind = "embedding" if "embedding" in caps and "completion" not in caps else "completion"
        kinds[kind].append((int(m.get("size") or 0), m["name"]))
    llm = os.environ.get("OLLAMA_TEST_MODEL") or (min(kinds["completion"])[1] if kinds["completion"] else "")
    embed = os.environ.get("OLLAMA_TEST_EMBED_MODEL") or (
        min(kinds["embedding"])[1] if kinds["embedding"] else None
    )
    return llm, embed


@pytest.fixture(params=["emulator", pytest.param("live", marks=pytest.mark.live_ollama)])
def server(request: pytest.FixtureRequest, make_ollama: Start) -> Server:
    if request.param == "emulator":
        emu = make_ollama(vram="24GiB", token_delay=0.02)
        return Server(emu.url, "qwen2.5:14b", "nomic-embed-text", emu)
    host = os.environ.get("OLLAMA_HOST")
    if not host:
        pytest.skip("OLLAMA_HOST not set: no real Ollama server to test against")
    url = host if host.startswith("http") else f"http://{host}"
    llm, embed = _live_models(url)
    if not llm:
        pytest.skip(f"OLLAMA_HOST={host} has no pulled completion model to test with")
    return Server(url, llm, embed)


def listed(url: str) -> list[str]:
    return [m["name"] for m in httpx.get(f"{url}/api/ps", timeout=10).json().get("models") or []]


async def test_load_observe_unload(make_ollama: Start) -> None:
    emu = make_ollama(unload_delay=0.3)
    async with provider(emu) as p:
        handle = await p.load(spec("qwen2.5:14b"))
        assert (handle.endpoint, handle.api) == (emu.url, "ollama")
        # the 4096-token context it was loaded with is part of what it holds
        assert handle.memory == {"cuda:0": 9 * GB + 4096 * KV}
        [seen] = await p.observe()
        assert seen.target == "qwen2.5:14b" and seen.memory == {"cuda:0": 9 * GB + 4096 * KV}
        assert seen.details["context_length"] == 4096
        freed = await p.unload(handle)
        # Ollama answered at once but listed the model for 0.3 s more: unload waited for /api/ps
        assert freed == {"cuda:0": 9 * GB + 4096 * KV} and emu.loaded() == [] and handle.closed


async def test_embedding_models_load_through_embed(make_ollama: Start) -> None:
    emu = make_ollama()
    async with provider(emu) as p:
        handle = await p.load(spec("nomic-embed-text", options={"kind": "embedding"}))
        assert emu.loaded() == ["nomic-embed-text:latest"] and emu.requests("/api/embed")
        await p.unload(handle)
        assert emu.loaded() == []


# -- 1. names: one identity per model --------------------------------------------------------


def test_target_key_is_ollamas_identity_of_a_name() -> None:
    """types/model/name.go ParseName + DisplayShortest, compared ignoring case."""
    p = OllamaProvider("ollama", OllamaSettings(base_url="http://x"))
    key = p.target_key("nomic-embed-text")
    assert (
        key == p.target_key("registry.ollama.ai/library/Nomic-Embed-Text:latest") == "nomic-embed-text:latest"
    )
    assert key == p.target_key("library/nomic-embed-text") == p.target_key("NOMIC-EMBED-TEXT:LATEST")
    assert p.target_key("nomic-embed-text:v1.5") != key
    assert p.target_key("hf.co/Org/Repo-GGUF:Q4_K_M") == "hf.co/org/repo-gguf:q4_k_m"
    assert p.target_key("me/model") == "me/model:latest" != p.target_key("model")


async def test_a_model_is_found_under_the_name_ollama_lists(server: Server) -> None:
    """Ollama lists ``model:tag`` in its own case: a target given otherwise is still found,
    observed under the registry's target, and waited for on unload."""
    variant = f"registry.ollama.ai/library/{server.llm.upper()}"
    if ":" not in server.llm:
        variant += ":latest"
    async with provider(server.url) as p:
        handle = await p.load(spec(variant, name="m"))
        seen = [o for o in await p.observe() if p.target_key(o.target) == p.target_key(variant)]
        assert [o.target for o in seen] == [variant]
        await p.unload(handle)
        assert all(p.target_key(n) != p.target_key(variant) for n in listed(server.url))


# -- 2. unloading an embedding model -----------------------------------------------------------


async def test_unloading_an_embedding_model_neither_loads_nor_reloads_it(server: Server) -> None:
    """/api/embed with keep_alive 0 loads (or, options differing, reloads) before it unloads;
    the empty /api/generate with keep_alive 0 unloads any model as it is."""
    if server.embed is None:
        pytest.skip("no embedding model pulled on this server")
    async with provider(server.url) as p:
        prepared = await p.prepare(spec(server.embed, options={"num_ctx": 2048}))
        assert prepared.options["kind"] == "embedding"
        handle = await p.load(prepared)
        await p.unload(handle)
        assert all(p.target_key(n) != p.target_key(server.embed) for n in listed(server.url))
        await p.unload(handle)  # again, now that it is gone: nothing is loaded to unload it
        assert all(p.target_key(n) != p.target_key(server.embed) for n in listed(server.url))
    if server.emu is not None:
        assert (server.emu.stats.loads, server.emu.stats.reloads) == (1, 0)


# -- 3. Ollama's own memory rule -----------------------------------------------------------------


async def test_the_estimate_is_what_ollama_will_take_and_the_context_is_sent(server: Server) -> None:
    """The context Ollama would pick on its own depends on the card: the provider sends one
    (``num_ctx``, default 4096) and estimates weights + the KV cache of that context."""
    async with provider(server.url) as p:
        prepared = await p.prepare(spec(server.llm))
        assert prepared.options["num_ctx"] == 4096
        handle = await p.load(prepared)
        [seen] = [o for o in await p.observe() if p.target_key(o.target) == p.target_key(server.llm)]
        if "context_length" in seen.details:
            assert seen.details["context_length"] == 4096
        await p.unload(handle)
    if server.emu is not None:  # the emulator's accounting is the prediction itself
        assert prepared.memory == {"cuda:0": 9 * GB + 4096 * KV} == seen.memory
        assert server.emu.requests("/api/generate")[0]["options"] == {"num_ctx": 4096}


async def test_the_modelfiles_context_is_the_one_sent(make_ollama: Start) -> None:
    emu = make_ollama(
        models={"long:8b": {"size": "5GB", "context_length": 131072, "modelfile_num_ctx": 16384}}
    )
    async with provider(emu) as p:
        prepared = await p.prepare(spec("long:8b"))
        assert prepared.options["num_ctx"] == 16384
        assert prepared.memory == {"cuda:0": 5 * GB + 16384 * KV + 768 * MIB}
        await p.load(prepared)
        [seen] = await p.observe()
        assert seen.memory == prepared.memory


async def test_a_model_ollama_evicted_is_reported_never_reloaded_by_a_refresh(server: Server) -> None:
    """Ollama evicts by its own rule (80 % of the free VRAM) and knows nothing of leases: a
    model gone from /api/ps is reported lost, and the keep-alive refresh (an empty request,
    which would load it again and evict another) is not sent."""
    lost: list[tuple[Handle, str]] = []
    async with provider(server.url) as p:
        p.bind(lambda handle, why: lost.append((handle, why)))
        handle = await p.load(spec(server.llm))
        async with httpx.AsyncClient(timeout=30) as http:  # another client, or Ollama's scheduler
            await http.post(f"{server.url}/api/generate", json={"model": server.llm, "keep_alive": 0})
        with anyio.fail_after(30):
            while any(p.target_key(n) == p.target_key(server.llm) for n in listed(server.url)):
                await anyio.sleep(0.1)
        await p.refresh(handle, 60)
        assert all(p.target_key(n) != p.target_key(server.llm) for n in listed(server.url))
        assert [h for h, _ in lost] == [handle] and "Ollama no longer lists" in lost[0][1]


async def test_a_load_that_makes_ollama_evict_a_leased_model_reports_it(make_ollama: Start) -> None:
    """On a "24 GB" card that is 22.4 GiB: mistral (13.5 GB) is resident, qwen (9.5 GB) fits
    the card but not 80 % of what is free, so Ollama evicts mistral to load it."""
    emu = make_ollama(vram="24GB")
    lost: list[str] = []
    async with provider(emu) as p:
        p.bind(lambda handle, why: lost.append(f"{handle.name}: {why}"))
        await p.load(await p.prepare(spec("mistral-small:22b")))
        await p.load(await p.prepare(spec("qwen2.5:14b")))
        assert emu.loaded() == ["qwen2.5:14b"]
        assert len(lost) == 1 and lost[0].startswith("mistral-small:22b: Ollama no longer lists")


# -- 4. time in flight ---------------------------------------------------------------------------


async def test_unload_waits_for_a_request_in_flight(server: Server) -> None:
    """keep_alive 0 during a request: Ollama answers at once and unloads when the request
    ends; unload() returns only then."""
    async with provider(server.url) as p:
        handle = await p.load(await p.prepare(spec(server.llm)))
        body = {"model": server.llm, "prompt": "count from one to twenty", "options": handle.request_options,
                "keep_alive": handle.keep_alive}  # fmt: skip
        done: list[float] = []
        generating = anyio.Event()
        async with httpx.AsyncClient(timeout=120) as http, anyio.create_task_group() as tg:

            async def generate() -> None:
                async with http.stream("POST", f"{server.url}/api/generate", json=body) as r:
                    async for _ in r.aiter_lines():
                        generating.set()
                done.append(time.monotonic())

            tg.start_soon(generate)
            with anyio.fail_after(60):  # not a fixed 0.1 s: a slow machine sent the unload first
                await generating.wait()
            await p.unload(handle)
            unloaded = time.monotonic()
        assert done and done[0] <= unloaded and handle.closed
        assert all(p.target_key(n) != p.target_key(server.llm) for n in listed(server.url))


async def test_an_unload_that_times_out_leaves_the_model_held_under_its_target(make_ollama: Start) -> None:
    # Found by the soak on the strict emulator: an unload that timed out (a request still
    # in flight) forgot the model, so the next observation offered Ollama's spelling of it
    # as somebody else's model while the manager still held it under its own target.
    emu = make_ollama(token_delay=0.05)
    lost: list[str] = []
    async with provider(emu, unload_timeout=0.2) as p:
        p.bind(lambda handle, why: lost.append(why))
        handle = await p.load(spec("Qwen2.5:14B", name="qwen"))
        body = {
            "model": "qwen2.5:14b",
            "prompt": "one two three four five six",
            "options": handle.request_options,
        }
        async with httpx.AsyncClient(timeout=30) as http, anyio.create_task_group() as tg:
            # the request stays in flight through the unload and the observation, however slow
            # the machine (a 0.5 s request, 0.1 s after it was sent, was too narrow a window)
            with emu.generation_held():
                tg.start_soon(partial(http.post, f"{emu.url}/api/generate", json=body))
                with anyio.fail_after(30):
                    while not (runner := emu.state.runners.get("qwen2.5:14b")) or not runner.in_flight:
                        await anyio.sleep(0.01)
                with pytest.raises(UnloadFailed, match="last request"):
                    await p.unload(handle)
                assert [o.target for o in await p.observe()] == ["Qwen2.5:14B"] and not lost
        assert await p.observe() == []  # gone once the request ended: reported, with why
        assert lost == ["Ollama no longer lists 'Qwen2.5:14B' in /api/ps: the unload that timed out took effect "
                        "(Ollama waited for its last request)"]  # fmt: skip


async def test_a_runtime_oom_drops_every_model_and_each_is_reported(make_ollama: Start) -> None:
    emu = make_ollama(vram="24GiB")
    lost: list[str] = []
    async with provider(emu) as p:
        p.bind(lambda handle, why: lost.append(handle.name))
        qwen = await p.load(await p.prepare(spec("qwen2.5:14b")))
        await p.load(await p.prepare(spec("nomic-embed-text")))
        emu.oom_during_generation("qwen2.5:14b")
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "prompt": "a b c",
                                "stream": False, "options": qwen.request_options})  # fmt: skip
        assert r.status_code == 500 and isinstance(
            map_error(r, model="qwen", provider="ollama", url=emu.url), InsufficientMemory
        )
        assert await p.observe() == [] and sorted(lost) == ["nomic-embed-text", "qwen2.5:14b"]
        await p.refresh(qwen, 60)
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
        # attempts for seconds, not the default 4 (about 0.4 s of back-off, which a slow
        # machine's restart of the emulator 0.3 s from now could outlast)
        async with provider(emu, retries=10) as patient, anyio.create_task_group() as tg:
            tg.start_soon(restart_later)
            assert await patient.observe() == []  # refused, refused, ..., then answered
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
        *[
            (httpx.Response(500, json={"error": text}, request=req), InsufficientMemory)
            for text in (  # llm/status.go outOfMemorySubstrings, as runners print them
                "ggml_vulkan: Device memory allocation of size 1 failed: ErrorOutOfMemory",
                "CUDA error: out of device memory",
                "hipMalloc failed: out of memory",
                "ggml_backend_cpu_buffer_type_alloc_buffer: allocation failed",
                "not enough memory to load the model",
                "vk::Device::allocateMemory: vk_error_out_of_device_memory",
                "llama runner process has terminated: error loading model: failed to allocate buffer",
            )
        ],
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
        # the native 8192 fits in 11 GB: 9 GB of weights, 8192 x 131072 bytes of KV cache and
        # the 768 MiB graph surcharge above 4096 tokens
        assert prepared.options["num_ctx"] == 8192
        assert prepared.memory["cuda:0"] == 9 * GB + 8192 * KV + 768 * MIB
        await p.load(prepared)
        [seen] = await p.observe()
        assert seen.details["context_length"] == 8192 and seen.memory == prepared.memory
        # in 10 GB the surcharge does not fit beside more than 4096 tokens
        tight = await p.prepare(s.model_copy(update={"options": {**s.options, "max_memory": "10GB"}}))
        assert tight.options["num_ctx"] == 4096 and tight.memory["cuda:0"] == 9 * GB + 4096 * KV


def config(emu: OllamaEmulator, models: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "providers": {"ollama": {"base_url": emu.url, "retry_initial": 0.05}},
        "budgets": {"cuda:0": "24GB", "cpu": "64GB"},
        "models": {n: {"provider": "ollama", **m} for n, m in models.items()},
        **extra,
    }


async def test_manager_adopts_and_reconciles(make_ollama: Start) -> None:
    emu = make_ollama(vram="24GiB")  # a real 24 GB card: 13.5 + 9.5 GB pass Ollama's 80 % rule
    async with httpx.AsyncClient() as client:
        # another client loads it with a 4096-token context (its default would be 32768 here)
        await client.post(
            f"{emu.url}/api/generate", json={"model": "mistral-small:22b", "options": {"num_ctx": 4096}}
        )
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
    a, b = make_ollama(vram="16GiB"), make_ollama(vram="24GiB")
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
    context = 4096 * KV  # each is loaded with num_ctx 4096, whose KV cache it holds too
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        for name in ("mistral-a", "mistral-b", "qwen-b", "qwen-a"):
            await mm.load(name)
        assert a.loaded() == ["qwen2.5:14b"]  # 13.5 + 9.5 > 16 GB on box A: mistral made room
        assert sorted(b.loaded()) == ["mistral-small:22b", "qwen2.5:14b"]  # 23 GB fit on box B
        assert mm.usage() == {"box-a:cuda:0": 9 * GB + context, "box-b:cuda:0": 22 * GB + 2 * context}


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
    # (given up on once Ollama is loading, not after a fixed time: on a slow machine the
    # load's request had not even reached the emulator when a 0.25 s timeout ran out)
    emu = make_ollama(load_delay=2.0)
    async with provider(emu, retries=1) as p:
        with anyio.CancelScope() as give_up:
            async with anyio.create_task_group() as tg:

                async def give_up_once_loading() -> None:
                    with anyio.fail_after(30):
                        while not (runner := emu.state.runners.get("qwen2.5:14b")) or not runner.loading:
                            await anyio.sleep(0.01)
                    emu.busy(1)  # the next request, the clean-up unload, is refused
                    give_up.cancel()

                tg.start_soon(give_up_once_loading)
                await p.load(spec("qwen2.5:14b"))
                pytest.fail("the load ended before it was given up on")
        assert give_up.cancelled_caught
        with anyio.fail_after(30):
            while "qwen2.5:14b" not in emu.loaded():  # Ollama finishes the load anyway
                await anyio.sleep(0.05)
        assert await p.observe() == []  # not offered for adoption: this provider gave up on it
        with anyio.fail_after(30):
            while emu.loaded():
                await anyio.sleep(0.05)
