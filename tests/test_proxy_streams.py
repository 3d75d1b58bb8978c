"""The proxy when streams break: the runtime cuts a stream short, or the client hangs up
mid-stream.  Either way the lease is released and the next request is served."""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelmora.server import create_app
from modelmora.testing.threaded import ThreadedServer

# An OpenAI-style server whose stream dies after two chunks when the prompt says "cut".
UPSTREAM = textwrap.dedent(
    """
    import json, sys, anyio, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "flaky", "object": "model"}]})

    async def chat(request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        async def chunks():
            for word in ["one", "two", "three", "four"]:
                yield ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": word}}]}) + "\\n\\n").encode()
                await anyio.sleep(0.05)
                if text == "cut" and word == "two":
                    raise RuntimeError("runtime died mid-stream")
            yield b"data: [DONE]\\n\\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="critical")
    """
)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[str]:
    script = tmp_path / "upstream.py"
    script.write_text(UPSTREAM)
    config: dict[str, Any] = {
        "budgets": {"cpu": "4GB"},
        "providers": {"process": {"state_dir": str(tmp_path / "state")}},
        "models": {"flaky": {"provider": "process", "target": "flaky", "device": "cpu", "memory": "60MB",
                             "options": {"command": [sys.executable, str(script), "${PORT}"], "health": "/v1/models"}}},
    }  # fmt: skip
    with ThreadedServer(create_app(config)) as server:
        try:
            yield server.url
        finally:
            # the process provider leaves servers running when the manager closes (by design:
            # a restart adopts them), so the test stops the upstream.py it started
            unloaded = httpx.post(f"{server.url}/unload-all", json={"force": True}, timeout=30)
            assert unloaded.status_code == 200, unloaded.text


def leases(url: str) -> Callable[[], int]:
    return lambda: sum(m["leases"] for m in httpx.get(f"{url}/status").json()["models"])


def stream(url: str, text: str) -> httpx.Response:
    body = {"model": "flaky", "stream": True, "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def test_a_stream_the_runtime_cuts_short_releases_the_lease(proxy: str) -> None:
    whole = stream(proxy, "hello")
    assert whole.status_code == 200 and whole.text.count("data: ") == 5
    with pytest.raises(httpx.RemoteProtocolError):
        stream(proxy, "cut")  # the proxy passes the cut on: the client sees an incomplete body
    assert leases(proxy)() == 0
    again = stream(proxy, "hello")
    assert again.status_code == 200 and again.text.endswith("data: [DONE]\n\n")


def test_a_client_that_hangs_up_mid_stream_releases_the_lease(proxy: str) -> None:
    body = {"model": "flaky", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    with httpx.stream("POST", f"{proxy}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        first = next(response.iter_raw())
        assert first.startswith(b"data: ")
    # closed after the first chunk; the server notices on its next write
    deadline = time.monotonic() + 5
    while leases(proxy)() != 0:
        assert time.monotonic() < deadline, "the lease of a hung-up client was never released"
        time.sleep(0.05)
    assert stream(proxy, "hello").status_code == 200
