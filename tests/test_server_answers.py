"""The server's answers are right before they are fast: names with ``/`` reach their routes,
a request that will be refused touches no model, Retry-After says the real wait, and a
boolean is not a duration.  Over real HTTP against a live server."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from modelmora.cli import app as cli
from modelmora.server import create_app
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    servers: list[ThreadedServer] = []

    def start(config: Any, **kwargs: Any) -> str:
        server = ThreadedServer(create_app(config, **kwargs)).start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


def ollama_config(emu: OllamaEmulator, **extra: Any) -> dict[str, Any]:
    return {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}},
        "models": {
            "llm": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB", "group": "heavy"},
            "embed": {"provider": "ollama", "target": "nomic-embed-text", "memory": "300MB", "group": "heavy",
                      "options": {"kind": "embedding"}},
            # the same runtime model, its kind left for the provider to find out (/api/show)
            "embed-auto": {"provider": "ollama", "target": "nomic-embed-text", "memory": "300MB", "group": "heavy"},
        },
        **extra,
    }  # fmt: skip


# -- 7. names with "/" -----------------------------------------------------------------------


def test_names_with_a_slash_reach_their_routes(
    serve: Callable[..., str], make_ollama: Callable[..., OllamaEmulator]
) -> None:
    emu = make_ollama()
    # a model someone else loaded: adopted as ollama/<target>, not in the registry
    httpx.post(f"{emu.url}/api/generate", json={"model": "mistral-small:22b", "keep_alive": -1}, timeout=30)
    config = ollama_config(emu)
    config["models"]["team/llm"] = config["models"].pop("llm")
    url = serve(config)
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/models/team/llm/load").status_code == 200
        assert "qwen2.5:14b" in emu.loaded()
        assert c.post("/models/team%2Fllm/unload").json() == {"model": "team/llm", "unloaded": True}
        assert "ollama/mistral-small:22b" in c.get("/health").json()["loaded"]
        adopted = c.post("/models/ollama/mistral-small:22b/unload", json={"force": True})
        assert adopted.status_code == 200, adopted.text
        assert adopted.json()["unloaded"] is True and "mistral-small:22b" not in emu.loaded()
        unknown = c.post("/models/team/lmm/load")
        assert unknown.status_code == 404 and "did you mean 'team/llm'" in unknown.json()["error"]["message"]
    runner = CliRunner()
    loaded = runner.invoke(cli, ["load", "team/llm", "--url", url])
    assert loaded.exit_code == 0, loaded.output
    unloaded = runner.invoke(cli, ["unload", "team/llm", "--url", url])
    assert unloaded.exit_code == 0 and unloaded.output.strip() == "unloaded team/llm"


# -- 8. a request that will be refused swaps nothing ------------------------------------------


def test_a_request_the_model_cannot_serve_leaves_residency_alone(
    serve: Callable[..., str], make_ollama: Callable[..., OllamaEmulator]
) -> None:
    emu = make_ollama()
    url = serve(ollama_config(emu))
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/models/llm/load").status_code == 200
        loads = emu.stats.loads
        for model in ("embed", "embed-auto"):
            for path in ("/v1/chat/completions", "/v1/completions"):
                body = {"model": model, **CHAT} if "chat" in path else {"model": model, "prompt": "x"}
                refused = c.post(path, json=body)
                assert refused.status_code == 400, (model, path, refused.text)
                assert refused.json()["error"]["code"] == "unsupported_endpoint"
                assert "serves /v1/embeddings only" in refused.json()["error"]["message"]
        assert emu.stats.loads == loads and c.get("/health").json()["loaded"] == ["llm"]
        assert c.post("/v1/embeddings", json={"model": "embed", "input": "x"}).status_code == 200


def test_a_simulated_model_answers_requests_with_one_clear_error(serve: Callable[..., str]) -> None:
    url = serve({"budgets": {"cuda:0": "16GB"}, "models": {"llm": {"memory": "8GB"}}})
    with httpx.Client(base_url=url, timeout=30) as c:
        for path, body in (
            ("/v1/embeddings", {"model": "llm", "input": ["a", "b"]}),
            ("/v1/chat/completions", {"model": "llm", **CHAT}),
        ):
            reply = c.post(path, json=body)
            assert reply.status_code == 400, (path, reply.text)
            assert "simulated" in reply.json()["error"]["message"]
        assert c.get("/health").json()["loaded"] == []


# -- 9. Retry-After ---------------------------------------------------------------------------


def test_retry_after_is_the_real_back_off(
    serve: Callable[..., str], make_ollama: Callable[..., OllamaEmulator]
) -> None:
    emu = make_ollama()
    config = ollama_config(emu, failure_cooldown="40s")
    config["models"]["gone"] = {"provider": "ollama", "target": "not-pulled:7b", "memory": "1GB"}
    url = serve(config)
    with httpx.Client(base_url=url, timeout=30) as c:
        first = c.post("/models/gone/load")
        assert first.status_code == 404, first.text
        for reply in (
            c.post("/models/gone/load"),
            c.post("/v1/chat/completions", json={"model": "gone", **CHAT}),
        ):
            assert reply.status_code == 503, reply.text
            wait = int(reply.headers["retry-after"])
            assert 30 <= wait <= 40, wait
            said = re.search(r"next attempt allowed in ([\d.]+)s", reply.json()["error"]["message"])
            assert said is not None and abs(float(said[1]) - wait) <= 1, reply.text


# -- 11. booleans are not durations -----------------------------------------------------------


def test_a_boolean_is_not_a_duration(
    serve: Callable[..., str], make_ollama: Callable[..., OllamaEmulator]
) -> None:
    emu = make_ollama()
    url = serve(ollama_config(emu))
    with httpx.Client(base_url=url, timeout=30) as c:
        for value in (True, False):
            rest = c.post("/models/llm/load", json={"keep_alive": value})
            assert rest.status_code == 422, rest.text
            proxy = c.post("/v1/chat/completions", json={"model": "llm", "keep_alive": value, **CHAT})
            assert proxy.status_code == 422, proxy.text
            header = c.post("/v1/chat/completions", json={"model": "llm", **CHAT},
                            headers={"X-Keep-Alive": str(value).lower()})  # fmt: skip
            assert header.status_code == 400, header.text
        assert emu.stats.loads == 0
        assert c.post("/models/llm/load", json={"keep_alive": 90}).status_code == 200
        assert c.get("/status").json()["models"][0]["expires_in_s"] > 60


def test_memory_that_waiting_cannot_free_is_a_conflict_not_a_server_error(serve: Callable[..., str]) -> None:
    """Found by schemathesis: a load refused because pinned models hold the budget (or one
    bigger than the budget) answered 503 + Retry-After, but retrying cannot help: 409."""
    url = serve({"budgets": {"cuda:0": "16GB"}, "models": {"a": {"memory": "10GB"}, "b": {"memory": "9GB"}, "big": {"memory": "20GB"}}})  # fmt: skip
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/models/a/load", json={"pin": True}).status_code == 200
        for name, said in (("b", "pinned models hold"), ("big", "but the budget is 16.0 GB")):
            reply = c.post(f"/models/{name}/load")
            assert reply.status_code == 409, reply.text
            assert said in reply.json()["error"]["message"] and "retry-after" not in reply.headers


# -- issue 26, 4: an outage costs nothing healthy ----------------------------------------------


def test_an_unreachable_runtime_is_a_503_with_retry_after_and_named_by_health(
    serve: Callable[..., str],
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {
        "budgets": {"cuda:0": "24GB"},
        "outage_cooldown": "30s",
        "providers": {"ollama": {"base_url": f"http://127.0.0.1:{port}"}},
        "models": {
            "sim": {"provider": "simulated", "memory": "4GB", "group": "heavy"},
            "llm": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "4GB", "group": "heavy"},
        },
    }
    url = serve(config)
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/models/sim/load").status_code == 200
        first = c.post("/models/llm/load")  # the failure that finds the outage says so too
        assert first.status_code == 503 and first.json()["error"]["code"] == "ProviderOutage", first.text
        assert 1 <= int(first.headers["retry-after"]) <= 30
        again = c.post("/v1/chat/completions", json={"model": "llm", **CHAT})
        assert again.status_code == 503, again.text
        assert again.json()["error"]["code"] == "ProviderOutage"
        assert 1 <= int(again.headers["retry-after"]) <= 30
        assert "ollama" in again.json()["error"]["message"]
        loaded = {m["name"] for m in c.get("/models").json() if m["loaded"]}
        assert loaded == {"sim"}  # nothing evicted for a runtime that is down
        health = c.get("/health").json()
        assert health["status"] == "degraded"
        assert set(health["outages"]) == {"ollama"}
        assert health["outages"]["ollama"]["since"]  # a wall-clock time
        assert "127.0.0.1" in health["outages"]["ollama"]["error"]


def test_the_request_that_finds_the_runtime_down_is_a_503_with_retry_after(
    serve: Callable[..., str], make_ollama: Callable[..., OllamaEmulator]
) -> None:
    """Ollama answered at start and has died since: the load itself meets the dead runtime
    (nothing to evict, so no reconcile first).  Its caller gets what every later caller
    gets, 503 ProviderOutage with Retry-After (red: 502 RuntimeUnreachable with no
    Retry-After, so clients that retry on 503 gave up)."""
    emu = make_ollama(models={"qwen2.5:14b": "9GB"})
    config = {
        "budgets": {"cuda:0": "24GB"},
        "outage_cooldown": "30s",
        "providers": {"ollama": {"base_url": emu.url, "retries": 1}},
        "models": {"llm": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"}},
    }
    url = serve(config)
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        emu.stop()
        first = c.post("/v1/chat/completions", json={"model": "llm", **CHAT})
        assert first.status_code == 503, first.text
        assert first.json()["error"]["code"] == "ProviderOutage"
        assert 1 <= int(first.headers["retry-after"]) <= 30
