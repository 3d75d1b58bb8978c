"""Issue 25 over HTTP: back-pressure (429 with Retry-After before any byte of a stream),
per-request priority (``X-Priority``) and API keys with their own priority, weight and
model allow-list."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from modelmora.server import create_app
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer


def config_for(emu: OllamaEmulator, **extra: Any) -> dict[str, Any]:
    return {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}},
        "models": {
            "qwen": {
                "provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB",
                "max_concurrency": 1, "max_queue": 0,
            },
            "mistral": {"provider": "ollama", "target": "mistral-small:22b", "memory": "13GB"},
        },
        "reaper_interval": 0.05,
        **extra,
    }  # fmt: skip


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    servers: list[ThreadedServer] = []

    def start(config: dict[str, Any], **kwargs: Any) -> str:
        server = ThreadedServer(create_app(config, **kwargs)).start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


def chat(model: str, *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "one two three four five"}],
    }


def test_a_request_past_the_queue_bound_gets_429_with_retry_after_before_any_byte_of_its_stream(
    serve: Callable[..., str], make_ollama: Callable[..., OllamaEmulator]
) -> None:
    """``qwen`` serves one request at a time and lets none wait: while a slow answer holds
    it, a streaming request is answered 429 at once, in JSON (not an event stream),
    with ``Retry-After`` and how many are in flight and waiting.  Red before issue 25:
    ``max_concurrency``/``max_queue`` did not exist (the second stream waited)."""
    emu = make_ollama(token_delay=0.2)
    url = serve(config_for(emu))
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/chat/completions", json=chat("qwen")).status_code == 200  # loaded
        first = threading.Thread(
            target=httpx.post,
            args=(f"{url}/v1/chat/completions",),
            kwargs={"json": chat("qwen"), "timeout": 30},
        )
        first.start()  # a slow answer (about 1.6 s of tokens) holds qwen's only slot
        deadline = time.monotonic() + 10
        while c.get("/status").json()["models"][0]["leases"] != 1:
            assert time.monotonic() < deadline, "the first request never took its lease"
            time.sleep(0.02)
        with c.stream("POST", "/v1/chat/completions", json=chat("qwen", stream=True)) as second:
            chunks = second.iter_raw()
            head = next(chunks)
            assert second.status_code == 429, head
            assert second.headers["content-type"].startswith("application/json")
            assert head.startswith(b"{"), head  # an error document, no byte of a stream
            assert int(second.headers["retry-after"]) >= 1
            assert (second.headers["x-modelmora-in-flight"], second.headers["x-modelmora-waiting"]) == (
                "1",
                "0",
            )
            error = json.loads(b"".join([head, *chunks]))["error"]
            assert error["code"] == "Overloaded" and error["in_flight"] == 1 and error["waiting"] == 0, error
            assert error["type"] == "rate_limit_error", error  # OpenAI's type for a 429
        first.join()
        assert c.post("/v1/chat/completions", json=chat("qwen")).status_code == 200  # the slot is free again


def test_api_keys_carry_priority_and_an_allow_list(
    serve: Callable[..., str], make_ollama: Callable[..., OllamaEmulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two API keys from the environment: ``batch`` may use ``mistral`` only (403 for
    ``qwen``, also on the hot path once qwen is loaded), ``ui`` everything; a request
    without a key is 401; ``X-Priority`` must be an integer (400, one line)."""
    monkeypatch.setenv("UI_KEY", "ui-secret")
    monkeypatch.setenv("BATCH_KEY", "batch-secret")
    emu = make_ollama()
    keys = {
        "ui": {"token_env": "UI_KEY", "priority": 5, "weight": 3},
        "batch": {"token_env": "BATCH_KEY", "priority": 0, "weight": 1, "models": ["mistral"]},
    }
    url = serve(config_for(emu, api_keys=keys))
    ui, batch = {"Authorization": "Bearer ui-secret"}, {"Authorization": "Bearer batch-secret"}
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/chat/completions", json=chat("qwen")).status_code == 401
        assert c.post("/v1/chat/completions", json=chat("qwen"), headers=ui).status_code == 200
        refused = c.post("/v1/chat/completions", json=chat("qwen"), headers=batch)  # qwen is ready: hot path
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed", (
            refused.text
        )
        assert c.post("/v1/chat/completions", json=chat("mistral"), headers=batch).status_code == 200
        bad = c.post("/v1/chat/completions", json=chat("mistral"), headers={**ui, "X-Priority": "high"})
        assert bad.status_code == 400 and "X-Priority" in bad.json()["error"]["message"], bad.text
        ok = c.post("/v1/chat/completions", json=chat("mistral"), headers={**ui, "X-Priority": "-3"})
        assert ok.status_code == 200
        # levels, not arbitrary integers: out of the range a config may give (red: accepted)
        huge = c.post("/v1/chat/completions", json=chat("mistral"), headers={**ui, "X-Priority": "99999999999999999999"})  # fmt: skip
        assert huge.status_code == 400 and "-1000" in huge.json()["error"]["message"], huge.text


def test_a_stream_in_flight_holds_its_slot_until_the_runtime_has_answered(
    serve: Callable[..., str], make_ollama: Callable[..., OllamaEmulator]
) -> None:
    """A streamed answer holds its lease while the runtime's stream is relayed: after its
    first chunk it still counts toward ``qwen``'s ``max_concurrency`` of 1 (in flight 1,
    listed as forwarded), so a second stream is refused 429 before any byte; once the
    runtime's stream has ended the slot is free.  (Issue 22 gives the lease back with the
    chunk that completes the runtime's answer, before the client has the last byte; this
    checks that the lease is not given back any earlier.)"""
    emu = make_ollama(token_delay=0.1)
    url = serve(config_for(emu))
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/chat/completions", json=chat("qwen")).status_code == 200  # loaded
        with c.stream("POST", "/v1/chat/completions", json=chat("qwen", stream=True)) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # mid-stream now
            status = c.get("/status").json()["models"][0]
            assert status["leases"] == 1, status
            listed = c.get("/requests").json()
            assert [(r["model"], r["state"]) for r in listed] == [("qwen", "forwarded")], listed
            with c.stream("POST", "/v1/chat/completions", json=chat("qwen", stream=True)) as second:
                head = next(second.iter_raw())
                assert second.status_code == 429 and head.startswith(b"{"), head
                assert second.headers["x-modelmora-in-flight"] == "1"
            rest = list(lines)
            assert "data: [DONE]" in rest, rest[-3:]
        assert c.get("/status").json()["models"][0]["leases"] == 0
        assert c.post("/v1/chat/completions", json=chat("qwen", stream=True)).status_code == 200
