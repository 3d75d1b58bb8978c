"""The proxy when streams break: the runtime cuts a stream short, or the client hangs up
mid-stream.  Either way the lease is released and the next request is served."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import proxy_over

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
    with proxy_over(tmp_path, UPSTREAM, "flaky", "flaky") as url:
        yield url


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
        # SSE comment lines (": loading flaky …", issue 25 item 5) may come first
        first = next(line for line in response.iter_lines() if line and not line.startswith(":"))
        assert first.startswith("data: ")
    # closed after the first chunk; the server notices on its next write
    deadline = time.monotonic() + 5
    while leases(proxy)() != 0:
        assert time.monotonic() < deadline, "the lease of a hung-up client was never released"
        time.sleep(0.05)
    assert stream(proxy, "hello").status_code == 200
