"""`modelmora serve` on a live uvicorn over loopback: REST, the OpenAI proxy (with the
official openai client and litellm), SSE, metrics, auth, limits, and the CLI's remote mode."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from modelmora.cli import app as cli
from modelmora.server import create_app
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer


def config_for(emu: OllamaEmulator, **extra: Any) -> dict[str, Any]:
    return {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}},
        "models": {
            "qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"},
            "mistral": {"provider": "ollama", "target": "mistral-small:22b", "memory": "13GB"},
            "embed": {
                "provider": "ollama",
                "target": "nomic-embed-text",
                "memory": "300MB",
                "options": {"kind": "embedding"},
            },
        },
        "reaper_interval": 0.05,
        **extra,
    }


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    servers: list[ThreadedServer] = []

    def start(config: dict[str, Any], *, host: str = "127.0.0.1", **kwargs: Any) -> str:
        server = ThreadedServer(create_app(config, **kwargs), host=host).start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


def test_rest_api_loads_lists_and_unloads(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    url = serve(config_for(emu))
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").json()["status"] == "ok"
        assert {m["name"] for m in c.get("/models").json()} == {"qwen", "mistral", "embed"}
        loaded = c.post("/models/qwen/load", json={"keep_alive": "10m", "pin": True})
        assert loaded.status_code == 200 and loaded.json()["memory"]["cuda:0"] > 0
        status = c.get("/status").json()
        (qwen,) = status["models"]
        assert (
            qwen["name"] == "qwen" and qwen["pinned"] and status["devices"]["cuda:0"]["budget"] == 24 * 10**9
        )
        assert emu.loaded() == ["qwen2.5:14b"]
        kept = c.post("/unload-all").json()
        assert kept == {"unloaded": [], "in_use": [], "pinned": ["qwen"], "failed": {}}
        assert c.post("/models/qwen/unload", json={"force": True}).json() == {
            "model": "qwen",
            "unloaded": True,
        }
        assert emu.loaded() == []


def test_bad_requests_are_clear_and_load_nothing(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    url = serve(config_for(emu), max_body=4096)
    with httpx.Client(base_url=url, timeout=30) as c:
        missing = c.post("/models/qwne/load")
        assert missing.status_code == 404 and "did you mean 'qwen'" in missing.json()["error"]["message"]
        assert c.post("/models/qwen/load", json={"keep_alive": "soon"}).status_code == 422
        assert c.post("/models/qwen/load", json={"pinned": True}).status_code == 422
        chat = c.post("/v1/chat/completions", json={"model": "qwen"})  # no messages
        assert chat.status_code == 422
        broken = c.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert broken.status_code == 422
        unknown = c.post(
            "/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
        )
        assert (
            unknown.status_code == 404 and "known: embed, mistral, qwen" in unknown.json()["error"]["message"]
        )
        inline = c.post("/v1/embeddings", json={"model": "ollama/nomic-embed-text", "input": "x"})
        assert inline.status_code == 404  # only registry names reach a runtime
        huge = c.post(
            "/v1/chat/completions",
            json={"model": "qwen", "messages": [{"role": "user", "content": "x" * 10_000}]},
        )
        assert huge.status_code == 413
        assert c.get("/status").json()["models"] == [] and emu.loaded() == [] and emu.stats.loads == 0


def test_openai_client_through_the_proxy(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    openai = pytest.importorskip("openai")
    url = serve(config_for(emu))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert {m.id for m in client.models.list()} == {"qwen", "mistral", "embed"}
    reply = client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "hello there"}]
    )
    assert "hello there" in (reply.choices[0].message.content or "")
    chunks = client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "stream me"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith(" stream me")
    done = client.completions.create(model="qwen", prompt="complete this")
    assert "complete this" in done.choices[0].text
    vectors = client.embeddings.create(model="embed", input=["a", "b"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 8
    # the proxy's keep_alive extension: unloaded as soon as this request is done
    client.chat.completions.create(
        model="mistral", messages=[{"role": "user", "content": "once"}], extra_body={"keep_alive": 0}
    )
    status = httpx.get(f"{url}/status").json()
    assert "mistral" not in {m["name"] for m in status["models"]}
    assert "mistral-small:22b" not in emu.loaded()
    assert all(m["leases"] == 0 for m in status["models"])


@pytest.mark.anyio
async def test_litellm_through_the_proxy(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    from modelmora.chain.llm import _litellm

    litellm = _litellm()
    url = serve(config_for(emu))
    reply = await litellm.acompletion(
        model="openai/qwen",
        api_base=f"{url}/v1",
        api_key="x",
        messages=[{"role": "user", "content": "via litellm"}],
    )
    assert "via litellm" in reply.choices[0].message.content
    stream = await litellm.acompletion(
        model="openai/qwen", api_base=f"{url}/v1", api_key="x", stream=True,
        messages=[{"role": "user", "content": "streamed via litellm"}],
    )  # fmt: skip
    parts = [c.choices[0].delta.content or "" async for c in stream]
    assert "".join(parts).endswith("streamed via litellm")


def test_keep_alive_header_and_queue_full(
    serve: Callable[..., str], make_ollama: Callable[..., OllamaEmulator]
) -> None:
    """The queue limit counts, per model, requests waiting for a load that has not started;
    requests joining a load under way pass, within the bytes all waiting bodies may hold."""
    slow = make_ollama()
    config = config_for(slow)
    for name in ("qwen", "mistral"):
        config["models"][name]["group"] = "heavy"
    url = serve(config, queue_limit=1, max_body=4096)
    body = {"messages": [{"role": "user", "content": "x"}]}
    results: dict[str, httpx.Response] = {}

    def send(key: str, model: str, **kwargs: Any) -> threading.Thread:
        def post() -> None:
            results[key] = httpx.post(f"{url}/v1/chat/completions", json={"model": model, **body}, timeout=30, **kwargs)  # fmt: skip

        thread = threading.Thread(target=post)
        thread.start()
        return thread

    def wait_for_depth(depth: int) -> None:
        deadline = time.monotonic() + 5
        while f"queue_depth {depth}.0" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, f"the queue never reached {depth}"
            time.sleep(0.02)

    # qwen's load lasts until the checks are done (a fixed 1.5 s load ended half-way
    # through them on a slow machine, and the waiting requests they count were gone)
    with slow.loads_held():
        waiting = [send("first", "qwen", headers={"X-Keep-Alive": "0"})]
        wait_for_depth(1)
        waiting.append(send("joins", "qwen"))  # qwen's load is under way: no swap, no limit
        wait_for_depth(2)
        waiting.append(send("next", "mistral"))  # waits for the group: the one mistral slot
        wait_for_depth(3)
        full = httpx.post(f"{url}/v1/chat/completions", json={"model": "mistral", **body}, timeout=30)
        assert full.status_code == 503 and full.headers["retry-after"] == "5"
        assert (
            full.json()["error"]["code"] == "queue_full"
            and "wait for 'mistral'" in full.json()["error"]["message"]
        )
        big = {"model": "qwen", "messages": [{"role": "user", "content": "x" * 3950}]}
        heavy = httpx.post(f"{url}/v1/chat/completions", json=big, timeout=30)
        assert heavy.status_code == 503 and "bytes" in heavy.json()["error"]["message"]
    for thread in waiting:
        thread.join()
    assert [results[k].status_code for k in ("first", "joins", "next")] == [200, 200, 200]
    assert "qwen" not in {m["name"] for m in httpx.get(f"{url}/status").json()["models"]}  # X-Keep-Alive: 0


def test_token_required_off_loopback(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    url = serve(config_for(emu), host="0.0.0.0", token="s3cret")
    local = url.replace("0.0.0.0", "127.0.0.1")
    assert httpx.get(f"{local}/health").status_code == 200
    denied = httpx.get(f"{local}/status")
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{local}/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{local}/status", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(f"{local}/?token=s3cret").status_code == 200
    refused = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"], env={"MODELMORA_TOKEN": ""})
    assert (
        refused.exit_code == 1 and "MODELMORA_TOKEN" in refused.output and "Traceback" not in refused.output
    )


def test_metrics_and_events(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    url = serve(config_for(emu))
    seen: list[dict[str, Any]] = []

    def listen() -> None:
        with httpx.stream("GET", f"{url}/events", timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["kind"] == "Unloaded":
                        return

    listener = threading.Thread(target=listen)
    listener.start()
    time.sleep(0.3)
    httpx.post(f"{url}/models/qwen/load", timeout=30)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    loads = {
        s.labels["model"]: s.value for s in families["modelmora_loads"].samples if s.name.endswith("_total")
    }
    assert loads == {"qwen": 1.0}
    resident = {
        (s.labels["model"], s.labels["device"]): s.value for s in families["modelmora_resident_bytes"].samples
    }
    assert resident == {("qwen", "cuda:0"): 9e9 + 2048 * 131072}  # + the KV cache of num_ctx 4096
    assert families["modelmora_budget_bytes"].samples[0].value == 24e9
    httpx.post(f"{url}/models/qwen/unload", timeout=30)
    listener.join(timeout=10)
    kinds = [e["kind"] for e in seen]
    assert kinds[:2] == ["Loading", "Loaded"] and kinds[-1] == "Unloaded"
    assert seen[1]["model"] == "qwen" and "loaded qwen" in seen[1]["text"]


def test_lease_events_reach_only_the_event_clients_that_ask_for_them(
    serve: Callable[..., str], emu: OllamaEmulator
) -> None:
    url = serve(config_for(emu))
    kinds: dict[str, list[str]] = {"?leases=true": [], "": []}
    connected = {query: threading.Event() for query in kinds}

    def listen(query: str) -> None:
        with httpx.stream("GET", f"{url}/events{query}", timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith(": connected"):
                    connected[query].set()
                elif line.startswith("data: "):
                    kinds[query].append(json.loads(line[6:])["kind"])
                    if kinds[query][-1] == "Unloaded":
                        return

    listeners = [threading.Thread(target=listen, args=(query,)) for query in kinds]
    for listener in listeners:
        listener.start()
    for event in connected.values():
        assert event.wait(30)
    chat = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):  # a load (full path), then a resident model (hot path)
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30).status_code == 200
    httpx.post(f"{url}/models/qwen/unload", timeout=30)
    for listener in listeners:
        listener.join(timeout=10)
    assert kinds["?leases=true"].count("LeaseAcquired") == 2 and kinds["?leases=true"].count("LeaseReleased") == 2
    assert "Loaded" in kinds[""] and not {"LeaseAcquired", "LeaseReleased"} & set(kinds[""])


def test_cli_remote_mode(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    url = serve(config_for(emu))
    runner = CliRunner()
    env = {"MODELMORA_URL": url, "COLUMNS": "160"}
    loaded = runner.invoke(cli, ["load", "qwen", "--keep-alive", "10m"], env=env)
    assert loaded.exit_code == 0 and "loaded qwen (cuda:0 9.3 GB)" in loaded.output
    assert json.loads(runner.invoke(cli, ["list-loaded", "--json"], env=env).stdout) == ["qwen"]
    status = runner.invoke(cli, ["status"], env=env)
    assert status.exit_code == 0 and "qwen" in status.output and "24.0 GB" in status.output
    assert runner.invoke(cli, ["unload", "qwen", "--url", url]).output.strip() == "unloaded qwen"
    assert "unloaded: nothing" in runner.invoke(cli, ["unload-all"], env=env).output
    bad = runner.invoke(cli, ["load", "nope"], env=env)
    assert bad.exit_code == 1 and "unknown model 'nope'" in bad.output
    gone = runner.invoke(cli, ["status"], env={"MODELMORA_URL": "http://127.0.0.1:9"})
    assert gone.exit_code == 1 and "cannot reach the modelmora server" in gone.output


@pytest.mark.torch
def test_in_process_embeddings_answer_through_the_proxy(serve: Callable[..., str]) -> None:
    pytest.importorskip("sentence_transformers", reason="the torch extra is not installed")
    from modelmora.testing.models import minilm_path

    config = {
        "budgets": {"cpu": "1GB"},
        "models": {"minilm": {"provider": "torch", "target": str(minilm_path()), "device": "cpu",
                              "memory": "91MB", "options": {"kind": "sentence-transformers"}}},
    }  # fmt: skip
    url = serve(config)
    reply = httpx.post(
        f"{url}/v1/embeddings",
        json={"model": "minilm", "input": ["a cat", "a kitten", "tax law"]},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    vectors = [d["embedding"] for d in reply.json()["data"]]
    assert len(vectors) == 3 and len(vectors[0]) == 384

    def cos(a: list[float], b: list[float]) -> float:
        return (
            sum(x * y for x, y in zip(a, b, strict=True))
            / (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5
        )

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])  # a real model, not noise
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "minilm", "messages": [{"role": "user", "content": "x"}]},
        timeout=60,
    )
    assert chat.status_code == 400 and "serves /v1/embeddings only" in chat.json()["error"]["message"]


def test_an_error_in_the_checks_or_the_hot_path_is_answered_in_the_api_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The security checks and the hot path run in front of FastAPI's own error layer: a bug
    there is still answered as every other internal error is (JSON, ``internal_error``)."""
    import anyio

    from modelmora.server.proxy import Proxy

    async def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Proxy, "hot", broken)
    config = {"budgets": {"cuda:0": "24GB"}, "models": {"m": {"provider": "simulated", "target": "x", "memory": "1GB"}}}  # fmt: skip
    app = create_app(config)

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post("/v1/chat/completions", json={"model": "m", "messages": []})

    reply = anyio.run(post)
    assert reply.status_code == 500
    assert reply.json()["error"]["code"] == "internal_error", reply.text
