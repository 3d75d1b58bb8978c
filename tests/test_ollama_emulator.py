"""The emulator speaks Ollama's protocol: the official `ollama` client parses every answer."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import httpx
import ollama
import pytest

from modelmora.testing.ollama import OllamaEmulator, parse_go_duration, parse_keep_alive

Start = Callable[..., OllamaEmulator]


def test_official_client_parses_every_endpoint(make_ollama: Start) -> None:
    emu = make_ollama()
    with ollama.Client(host=emu.url) as client:
        check_every_endpoint(emu, client)


def check_every_endpoint(emu: OllamaEmulator, client: ollama.Client) -> None:
    loaded = client.generate(model="mistral-small:22b", prompt="")
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    ps = client.ps()
    [m] = ps.models
    assert m.model == "mistral-small:22b" and m.size == 13_000_000_000 and m.size_vram == 13_000_000_000
    assert m.details is not None and m.details.family == "llama" and m.context_length == 2048
    assert m.expires_at is not None and m.expires_at > datetime.now(m.expires_at.tzinfo)
    streamed = list(client.generate(model="mistral-small:22b", prompt="hello there", stream=True))
    assert streamed[-1].done and streamed[-1].done_reason == "stop"
    assert "".join(c.response or "" for c in streamed).endswith(" hello there")
    reply = client.chat(model="mistral-small:22b", messages=[{"role": "user", "content": "hi you"}])
    assert reply.message.role == "assistant" and reply.message.content.endswith(" hi you")
    chunks = list(
        client.chat(model="mistral-small:22b", messages=[{"role": "user", "content": "x"}], stream=True)
    )
    assert chunks[-1].done
    emb = client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(emb.embeddings) == 2 and len(emb.embeddings[0]) == 8
    listing = client.list()
    assert {x.model for x in listing.models} == {"mistral-small:22b", "qwen2.5:14b", "nomic-embed-text"}
    shown = client.show("qwen2.5:14b")
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 8192
    assert shown.capabilities == ["completion"]
    unloaded = client.generate(model="mistral-small:22b", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert [x.model for x in client.ps().models] == ["nomic-embed-text"]
    assert client.delete("qwen2.5:14b").status == "success"
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="nope", prompt="")
    assert info.value.status_code == 404 and "not found" in info.value.error
    assert httpx.get(f"{emu.url}/api/version").json() == {"version": "0.5.7"}
    assert httpx.get(emu.url).text == "Ollama is running"


def test_openai_compatible_endpoint(make_ollama: Start) -> None:
    emu = make_ollama()
    r = httpx.post(
        f"{emu.url}/v1/chat/completions",
        json={"model": "qwen2.5:14b", "messages": [{"role": "user", "content": "ping"}], "keep_alive": 0},
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].endswith(" ping")
    assert emu.loaded() == ["qwen2.5:14b"]  # keep_alive has no effect through /v1
    assert httpx.get(f"{emu.url}/v1/models").json()["data"][0]["object"] == "model"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (300, 300.0),
        (1.5, 1.5),
        (-1, math.inf),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("-1m", math.inf),
        ("0", 0.0),
        ("500ms", 0.5),
        (None, 300.0),
    ],
)
def test_keep_alive_parsing_like_go(value: object, seconds: float) -> None:
    assert parse_keep_alive(value, 300.0) == seconds


@pytest.mark.parametrize("value", ["300", "5 minutes", "", "m", True, [1], {"a": 1}])
def test_keep_alive_rejects_what_ollama_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_keep_alive(value, 300.0)


def test_bare_numeric_string_is_a_400_with_gos_words(make_ollama: Start) -> None:
    emu = make_ollama()
    r = httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": "300"})
    assert r.status_code == 400 and r.json()["error"] == 'time: missing unit in duration "300"'
    assert parse_go_duration("2h45m30.5s") == 2 * 3600 + 45 * 60 + 30.5


def test_negative_keep_alive_means_forever(make_ollama: Start) -> None:
    emu = make_ollama()
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": -1})
    expires = datetime.fromisoformat(httpx.get(f"{emu.url}/api/ps").json()["models"][0]["expires_at"])
    assert expires - datetime.now(expires.tzinfo) > timedelta(days=365 * 100)


def test_models_expire_on_their_timer_and_unload_is_answered_before_memory_is_free(
    make_ollama: Start,
) -> None:
    emu = make_ollama(unload_delay=0.3)
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": 0.2})
    assert emu.loaded() == ["qwen2.5:14b"]
    deadline = time.monotonic() + 5
    while emu.loaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emu.loaded() == []
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b"})
    r = httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": 0}).json()
    assert r["done_reason"] == "unload"
    assert emu.loaded() == ["qwen2.5:14b"]  # still listed: the runner is shutting down


def test_max_loaded_models_and_victim_choice(make_ollama: Start) -> None:
    emu = make_ollama(models={"a": "1GB", "b": "1GB", "c": "1GB"}, max_loaded=2)
    httpx.post(f"{emu.url}/api/generate", json={"model": "a", "keep_alive": "1h"})
    httpx.post(f"{emu.url}/api/generate", json={"model": "b", "keep_alive": "1m"})
    httpx.post(f"{emu.url}/api/generate", json={"model": "c", "keep_alive": "30m"})
    assert sorted(emu.loaded()) == ["a", "c"]  # b had the shortest keep-alive


def test_vram_budget_and_partial_offload(make_ollama: Start) -> None:
    emu = make_ollama(models={"big": "20GB", "huge": "42GB", "small": "3GB"}, vram="24GB")
    httpx.post(f"{emu.url}/api/generate", json={"model": "small"})
    httpx.post(f"{emu.url}/api/generate", json={"model": "big"})
    assert sorted(emu.loaded()) == ["big", "small"]
    httpx.post(f"{emu.url}/api/generate", json={"model": "huge"})
    [huge] = httpx.get(f"{emu.url}/api/ps").json()["models"]
    assert huge["size"] == 42_000_000_000 and huge["size_vram"] == 24_000_000_000  # the rest on the CPU


def test_options_that_differ_force_a_reload(make_ollama: Start) -> None:
    emu = make_ollama()
    body = {"model": "qwen2.5:14b", "options": {"num_ctx": 4096}}
    httpx.post(f"{emu.url}/api/generate", json=body)
    httpx.post(f"{emu.url}/api/generate", json=body)
    assert emu.stats.reloads == 0 and emu.stats.loads == 1
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "options": {"num_ctx": 8192}})
    assert emu.stats.reloads == 1 and emu.stats.loads == 2
    assert httpx.get(f"{emu.url}/api/ps").json()["models"][0]["context_length"] == 8192


def test_faults(make_ollama: Start) -> None:
    emu = make_ollama()
    emu.busy(1)
    assert httpx.get(f"{emu.url}/api/ps").status_code == 503
    emu.oom_next("qwen2.5:14b")
    r = httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b"})
    assert r.status_code == 500 and "out of memory" in r.json()["error"]
    with emu.refuse_connections(), pytest.raises(httpx.ConnectError):
        httpx.get(f"{emu.url}/api/ps")
    assert httpx.get(f"{emu.url}/api/ps").status_code == 200


def test_older_servers_omit_context_length(make_ollama: Start) -> None:
    emu = make_ollama(report_context_length=False)
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b"})
    with ollama.Client(host=emu.url) as client:
        [m] = client.ps().models
    assert m.context_length is None


def test_embeddings_are_unit_length_as_ollamas_are(make_ollama: Start) -> None:
    """Real Ollama L2-normalises /api/embed and /v1/embeddings vectors; clients rely on a
    dot product being the cosine."""
    emu = make_ollama()
    texts = ["a", "modelmora keeps models resident"]
    native = httpx.post(f"{emu.url}/api/embed", json={"model": "nomic-embed-text", "input": texts})
    openai = httpx.post(f"{emu.url}/v1/embeddings", json={"model": "nomic-embed-text", "input": texts})
    vectors = [*native.json()["embeddings"], *(d["embedding"] for d in openai.json()["data"])]
    assert [math.sqrt(sum(x * x for x in v)) for v in vectors] == pytest.approx([1.0] * 4, abs=1e-9)
    assert vectors[0] == vectors[2] and vectors[1] == vectors[3]  # same text, same vector, both routes
    assert vectors[0] != vectors[1]
