"""The server's ring of recent proxied requests (what the status page replays on connect),
and the REST route the page's Unpin button calls."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from modelmora.server import create_app
from modelmora.server.recent import RecentRequests, RequestRecord
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer


def record(n: int, status: int = 200) -> RequestRecord:
    return RequestRecord(float(n), "POST", "/v1/chat/completions", f"m{n}", status, 0.5, None)


def test_the_ring_keeps_the_last_requests_only() -> None:
    ring = RecentRequests(size=3)
    for n in range(5):
        ring.add(record(n))
    assert [r.model for r in ring] == ["m2", "m3", "m4"] and len(ring) == 3
    with pytest.raises(ValueError, match="at least 1"):
        RecentRequests(size=0)


def test_listeners_get_each_new_request_and_a_broken_one_is_dropped() -> None:
    ring = RecentRequests()
    seen: list[str] = []

    def broken(_: RequestRecord) -> None:
        raise RuntimeError("gone")

    stop = ring.subscribe(lambda r: seen.append(r.model))
    ring.subscribe(broken)
    ring.add(record(1))  # the broken listener does not stop the request or the others
    ring.add(record(2))
    stop()
    ring.add(record(3))
    assert seen == ["m1", "m2"] and len(ring) == 3


def test_a_record_reads_as_the_request_log_line() -> None:
    waited = RequestRecord(1.0, "POST", "/v1/chat/completions", "qwen", 200, 0.1064, 0.06)
    assert waited.describe() == "POST /v1/chat/completions qwen 200 0.106s (waited 0.06s for its load)"
    left = RequestRecord(1.0, "POST", "/v1/embeddings", "e", 0, 2.0)
    assert left.describe() == "POST /v1/embeddings e - 2.000s"
    assert left.to_dict()["kind"] == "Request" and left.to_dict()["waited_s"] is None


def _events(url: str, query: str, until: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{url}/events{query}", timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if until(seen):
                    return seen
    return seen


def test_events_replay_the_recent_requests_only_to_clients_that_ask(
    make_ollama: Callable[..., OllamaEmulator],
) -> None:
    emu = make_ollama()
    config = {
        "providers": {"ollama": {"base_url": emu.url}},
        "models": {"qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"}},
    }
    body = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
    with ThreadedServer(create_app(config)) as server:
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).status_code == 200
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).status_code == 200
        seen = _events(server.url, "?requests=true", lambda s: sum(e["kind"] == "Request" for e in s) == 2)
        requests = [e for e in seen if e["kind"] == "Request"]
        assert all(e["history"] and e["model"] == "qwen" and e["status"] == 200 for e in requests)
        assert requests[0]["waited_s"] is not None and requests[1]["waited_s"] is None  # the first loaded it
        assert requests[0]["route"] == "/v1/chat/completions" and requests[0]["duration_s"] > 0
        plain = _events(server.url, "", lambda s: s[-1]["kind"] == "Loaded")
        assert all(e["kind"] != "Request" for e in plain)


def test_unpin_lets_a_pinned_model_go_like_any_other(make_ollama: Callable[..., OllamaEmulator]) -> None:
    emu = make_ollama()
    config = {
        "providers": {"ollama": {"base_url": emu.url}},
        "models": {"qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"}},
    }
    with ThreadedServer(create_app(config)) as server:
        load = httpx.post(f"{server.url}/models/qwen/load", json={"pin": True}, timeout=30)
        assert load.json()["pinned"] is True

        def pinned() -> list[bool]:
            return [m["pinned"] for m in httpx.get(f"{server.url}/status").json()["models"]]

        assert pinned() == [True]
        assert httpx.post(f"{server.url}/models/qwen/unpin").json() == {"model": "qwen", "pinned": False}
        assert pinned() == [False]
        unknown = httpx.post(f"{server.url}/models/qwne/unpin")
        assert unknown.status_code == 404 and "qwen" in unknown.json()["error"]["message"]
