"""Issue 22, item 8: a proxied answer's lease is given back before its last byte goes out,
so a client that has read the whole answer and at once asks to unload the model is not
told that the model is "in use by 1 lease".

The moment is caught deterministically: an ASGI layer in front of the whole app notes the
model's leases when the message that ends the body is sent, which is when the client can
have the last byte.  Both the full path (a streamed answer) and the hot path (a plain
answer for a ready model) are covered."""

from __future__ import annotations

import contextlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelmora import ModelManager
from modelmora.server import create_app
from modelmora.server.proxy import Proxy
from modelmora.testing.threaded import ThreadedServer

# An OpenAI-style server: a streamed answer in four chunks, or a plain JSON one.
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
            return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": "one two"}}]})
        async def chunks():
            for word in ["one", "two", "three"]:
                yield ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": word}}]}) + "\\n\\n").encode()
            yield b"data: [DONE]\\n\\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    routes = [Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=int(sys.argv[1]), log_level="critical")
    """
)


class EndOfBody:
    """In front of the whole app: for each proxied request, the model's leases at the
    moment the message that ends the answer's body is sent."""

    def __init__(self, app: ASGIApp, manager: ModelManager):
        self.app = app
        self.manager = manager
        self.leases: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.leases.append(self.manager.leases("m"))
            await send(message)

        await self.app(scope, receive, watched)


@contextlib.contextmanager
def served(tmp_path: Path) -> Iterator[tuple[str, EndOfBody]]:
    script = tmp_path / "upstream.py"
    script.write_text(UPSTREAM)
    config: dict[str, Any] = {
        "budgets": {"cpu": "4GB"},
        "providers": {"process": {"state_dir": str(tmp_path / "state")}},
        "models": {"m": {"provider": "process", "target": "words", "device": "cpu", "memory": "60MB",
                         "options": {"command": [sys.executable, str(script), "${PORT}"], "health": "/v1/models"}}},
    }  # fmt: skip
    app: Any = create_app(config)
    watch = EndOfBody(app.front, app.state.manager)
    app.front = watch
    with ThreadedServer(app) as server:
        try:
            yield server.url, watch
        finally:
            # the process provider leaves servers running when the manager closes: stop it
            unloaded = httpx.post(f"{server.url}/unload-all", json={"force": True}, timeout=30)
            assert unloaded.status_code == 200, unloaded.text


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_streamed_answer_gives_its_lease_back_before_its_last_byte(tmp_path: Path) -> None:
    """The full path (a streamed answer).  Red on 906aebf: the body ends while the model
    still has 1 lease (``_LeasedStream`` releases it after the last send), so an unload
    asked for at once is refused 409 "in use by 1 lease" (1 run in 4 on a busy machine)."""
    with served(tmp_path) as (url, watch):
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60
        ) as r:
            assert r.status_code == 200
            text = b"".join(r.iter_raw()).decode()
        assert text.endswith("data: [DONE]\n\n"), text
        assert watch.leases == [0], f"leases of m when the last byte went out: {watch.leases}"
        unload = httpx.post(f"{url}/models/m/unload", timeout=30)
        assert unload.status_code == 200 and unload.json()["unloaded"] is True, unload.text


def test_a_hot_path_answer_gives_its_lease_back_before_its_last_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path (a plain answer for a ready model).  Red on 906aebf: the body ends
    while the model still has 1 lease (``HotPath`` closes the answer after the last send)."""
    with served(tmp_path) as (url, watch):
        first = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)  # loads m (full path)
        assert first.status_code == 200, first.text

        async def full_path(*args: Any) -> None:
            raise AssertionError("a plain request for a ready model took the full path")

        monkeypatch.setattr(Proxy, "handle", full_path)  # the app runs in this process (a thread)
        watch.leases.clear()
        reply = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
        assert reply.status_code == 200, reply.text
        assert watch.leases == [0], f"leases of m when the last byte went out: {watch.leases}"
        unload = httpx.post(f"{url}/models/m/unload", timeout=30)
        assert unload.status_code == 200 and unload.json()["unloaded"] is True, unload.text
