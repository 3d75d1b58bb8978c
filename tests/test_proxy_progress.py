"""Issue 25, item 5: a streaming request that waits for its model gets SSE comment lines
(its place in the queue, the load's progress and ETA) that OpenAI's own client skips.

The server runs with ``progress_after=0``: a streaming request for a model that is not
ready opens its stream at once, so the first line is always a comment (no timing)."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from modelmora.server import create_app
from modelmora.testing.threaded import ThreadedServer

UPSTREAM = textwrap.dedent(
    """
    import json, sys, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "words", "object": "model"}]})

    async def chat(request):
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse({"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "one two three"}}]})
        async def chunks():
            for word in ["one", "two", "three"]:
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
                yield ("data: " + json.dumps(chunk) + "\\n\\n").encode()
            yield b"data: [DONE]\\n\\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    routes = [Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=int(sys.argv[1]), log_level="critical")
    """
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    script = tmp_path / "upstream.py"
    script.write_text(UPSTREAM)
    config: dict[str, Any] = {
        "budgets": {"cpu": "4GB"},
        "providers": {"process": {"state_dir": str(tmp_path / "state")}},
        "models": {"m": {"provider": "process", "target": "words", "device": "cpu", "memory": "60MB",
                         "options": {"command": [sys.executable, str(script), "${PORT}"], "health": "/v1/models"}}},
    }  # fmt: skip
    app = create_app(config, state_dir=tmp_path / "server", progress_after=0)
    with ThreadedServer(app) as running:
        try:
            yield running.url
        finally:
            unloaded = httpx.post(f"{running.url}/unload-all", json={"force": True}, timeout=30)
            assert unloaded.status_code == 200, unloaded.text


BODY = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def test_a_waiting_stream_gets_progress_lines_first(server: str) -> None:
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=BODY, timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    assert comments and lines[0] == comments[0], lines
    assert comments[0].startswith((": queued m, position 1", ": loading m")), comments
    assert lines[-1] == "data: [DONE]" and sum(line.startswith("data: {") for line in lines) == 3


def test_the_openai_client_streams_through_the_progress_lines(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with httpx.Client() as raw:
        assert raw.post(f"{server}/models/m/unload", json={}).status_code == 200  # cold again
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    words = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert words == "one two three "
    client.close()


def test_a_waiting_answer_that_asked_for_keepalive_gets_spaces_then_its_json(server: str) -> None:
    """Non-streaming opt-in (``X-Modelmora-Keepalive: 1``): while the model loads the
    answer is 200 with spaces (insignificant before JSON, RFC 8259), then the runtime's
    JSON; without the header a waiting answer sends nothing until it is whole."""
    body = {**BODY, "stream": False}
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json=body, headers={"X-Modelmora-Keepalive": "1"}, timeout=30
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        raw = response.read()
    assert raw.startswith(b" ") and json.loads(raw)["choices"][0]["message"]["content"] == "one two three"
    with httpx.Client() as plain:
        assert plain.post(f"{server}/models/m/unload", json={}).status_code == 200  # cold again
        answer = plain.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200 and not answer.content.startswith(b" ")


def test_the_openai_client_reads_a_kept_alive_answer(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Modelmora-Keepalive": "1"}
    )
    assert completion.choices[0].message.content == "one two three"
    client.close()
