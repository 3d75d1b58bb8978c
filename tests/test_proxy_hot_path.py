"""The proxy's hot path (a non-streaming request for a ready model, answered below FastAPI)
must answer exactly as the full path does: the runtime's bytes, the model renamed, the
keep-alive honoured and stripped, the request counted, the lease released — and every
request it does not take (bad bodies, unknown models, streaming) must get the full path's
answer, with nothing loaded or evicted on its account."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import proxy_over

from modelmora.server.proxy import Proxy

# An OpenAI-style server that answers with what it received (body and Accept-Encoding).
UPSTREAM = textwrap.dedent(
    """
    import json, sys, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "echo-target", "object": "model"}]})

    async def echo(request):
        body = await request.json()
        seen = {"received": body, "accept_encoding": request.headers.get("accept-encoding"),
                "peer": request.client.port}
        if body.get("stream"):
            async def chunks():
                yield ("data: " + json.dumps(seen) + "\\n\\n").encode()
                yield b"data: [DONE]\\n\\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")
        return JSONResponse(seen, headers={"x-runtime": "echo"})

    routes = [Route("/v1/models", models)] + [
        Route(path, echo, methods=["POST"]) for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
    ]
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=int(sys.argv[1]), log_level="critical")
    """
)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[str]:
    with proxy_over(tmp_path, UPSTREAM, "echo", "echo-target") as url:
        yield url


def status(url: str) -> dict[str, Any]:
    models = httpx.get(f"{url}/status", timeout=10).json()["models"]
    return {m["name"]: m for m in models}


def counted(url: str, code: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf'modelmora_proxy_requests_total\{{model="echo",status="{code}"\}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


def test_a_ready_model_answers_with_the_runtime_bytes_renamed_counted_and_released(
    proxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT, timeout=60)  # loads it (full path)
    assert first.status_code == 200, first.text

    async def full_path(*args: Any) -> None:
        raise AssertionError("a plain request for a ready model took the full path")

    monkeypatch.setattr(Proxy, "handle", full_path)  # the app runs in this process (a thread)
    before = counted(proxy, "200")
    reply = httpx.post(
        f"{proxy}/v1/chat/completions",
        json={**CHAT, "keep_alive": "7m", "temperature": 0.5},
        headers={"accept-encoding": "identity"},
        timeout=30,
    )
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    assert "x-runtime" not in reply.headers  # only the headers that describe the body pass
    seen = reply.json()
    assert seen["received"] == {**CHAT, "model": "echo-target", "temperature": 0.5}  # keep_alive stripped
    assert seen["accept_encoding"] == "identity"
    row = status(proxy)["echo"]
    assert row["leases"] == 0 and 6 * 60 < row["expires_in_s"] <= 7 * 60
    assert counted(proxy, "200") == before + 1
    header = httpx.post(f"{proxy}/v1/completions", json={"model": "echo", "prompt": "x"},
                        headers={"x-keep-alive": "-1"}, timeout=30)  # fmt: skip
    assert header.status_code == 200 and header.json()["received"]["prompt"] == "x"
    assert status(proxy)["echo"]["expires_in_s"] is None  # forever
    long = "word " * 100_000  # an answer of ~500 kB: many chunks from the runtime, passed on in order
    big = httpx.post(f"{proxy}/v1/completions", json={"model": "echo", "prompt": long}, timeout=30)
    assert big.status_code == 200 and big.json()["received"]["prompt"] == long


def test_the_hot_path_keeps_one_connection_to_the_runtime_alive(proxy: str) -> None:
    """Each request on a new TCP connection to the runtime cost more than the whole rest of
    the proxy (a connect, and a close the runtime then waits on)."""
    assert httpx.post(f"{proxy}/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
    with httpx.Client(timeout=30) as client:
        peers = {client.post(f"{proxy}/v1/chat/completions", json=CHAT).json()["peer"] for _ in range(5)}
    assert len(peers) == 1, peers


BAD = [
    ("chat/completions", {"model": "echo"}),  # no messages
    ("chat/completions", {"model": "echo", "messages": []}),
    ("chat/completions", {**CHAT, "keep_alive": "soon"}),
    ("chat/completions", {**CHAT, "keep_alive": True}),
    ("chat/completions", {**CHAT, "model": "nope"}),
    ("chat/completions", {**CHAT, "model": ""}),
    ("completions", {"model": "echo", "prompt": {"not": "a prompt"}}),
    ("embeddings", {"model": "echo"}),
]


def test_requests_the_hot_path_does_not_take_get_the_full_paths_answer(proxy: str) -> None:
    def answers() -> list[tuple[int, Any]]:
        out = []
        for route, body in BAD:
            reply = httpx.post(f"{proxy}/v1/{route}", json=body, timeout=30)
            out.append((reply.status_code, reply.json()))
        raw = httpx.post(f"{proxy}/v1/completions", content=b"{not json", timeout=30,
                         headers={"content-type": "application/json"})  # fmt: skip
        return [*out, (raw.status_code, raw.json())]

    cold = answers()  # the model is not loaded: nothing but the full path can answer
    assert all(code >= 400 for code, _ in cold) and "echo" not in status(proxy)
    assert httpx.post(f"{proxy}/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
    assert answers() == cold  # resident now: the same answers
    streamed = httpx.post(f"{proxy}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30)
    assert streamed.status_code == 200 and streamed.text.count("data: ") == 2
    assert status(proxy)["echo"]["leases"] == 0
