"""The proxy's hot path: a non-streaming OpenAI request for a model that is already
resident, answered as plain ASGI.

Every proxied request pays FastAPI's layers (exception middleware, routing, dependency
solving, body validation through FastAPI's field machinery, a task group per streamed
answer) before the lease and the forward that are the proxy's real work; on a resident
model with a fast runtime they were most of the proxy's added latency.  :class:`HotPath`
sits inside the security middleware (:class:`~modelmora.server.security.Guard` has already
checked the token, the origin and the body limits and read the body) and asks
:meth:`Proxy.hot <modelmora.server.proxy.Proxy.hot>` for the answer.  Anything that is not
the plain case — an invalid body, an unknown or not-ready model, streaming, a route the
model does not serve — gets None there and goes down the full FastAPI path with its body
replayed, so every error keeps one answer and one place that writes it.

Both paths are logged here, one line per proxied request on ``modelmora.requests`` once its
answer has gone out (method, path, model, status, seconds, and how long it waited for the
model's load), and kept in the server's ring of recent requests
(:class:`~modelmora.server.recent.RecentRequests`, shown by the status page).
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .proxy import NOTE, ROUTES, Proxy, RequestNote
from .recent import RecentRequests, RequestRecord
from .security import API_KEY, header

_PATHS = {f"/v1/{route}": route for route in ROUTES}
log = logging.getLogger("modelmora.requests")


def _done(
    recent: RecentRequests | None, scope: Scope, model: str, status: int, start: float, waited: float | None
) -> None:
    """A proxied request has ended: into the ring of recent requests and the request log."""
    record = RequestRecord(
        time.time(), scope["method"], scope["path"], model, status, time.perf_counter() - start, waited
    )
    if recent is not None:
        recent.add(record)
    if log.isEnabledFor(logging.INFO):
        log.info("%s", record.describe())


class HotPath:
    """ASGI middleware in front of the app's router; see the module docstring."""

    def __init__(self, app: ASGIApp, proxy: Proxy, recent: RecentRequests | None = None):
        self.app = app
        self.proxy = proxy
        self.recent = recent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _PATHS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        key = scope.get(API_KEY) if route is not None else None
        # a key's allow-list and X-Priority are checked on the full path
        if (
            route is None
            or (key is not None and key.models is not None)
            or header(scope, b"x-priority") is not None
        ):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        first = await receive()
        answer = None
        if first["type"] == "http.request" and not first.get("more_body", False):
            keep_alive = header(scope, b"x-keep-alive")
            answer = await self.proxy.hot(
                route,
                bytes(first.get("body", b"")),
                keep_alive.decode("latin-1") if keep_alive is not None else None,
                (header(scope, b"accept-encoding") or b"identity").decode("latin-1"),
            )
        if answer is None:
            await self._noted(scope, _replay(first, receive), send, start)
            return
        try:
            await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
            held = b""  # one chunk held back, so that the last goes out with the end of the body
            async for chunk in answer.body:
                if held:
                    await send({"type": "http.response.body", "body": held, "more_body": True})
                held = chunk
            # the runtime has answered in full: the lease ends before the client can have the
            # last byte, so "answer read → unload" never finds its own request holding it
            answer.close()
            await send({"type": "http.response.body", "body": held, "more_body": False})
        finally:
            answer.close()  # no await: nothing can cancel it
        _done(self.recent, scope, answer.model, answer.status, start, None)

    async def _noted(self, scope: Scope, receive: Receive, send: Send, start: float) -> None:
        """The full path: the proxy notes the model and its wait in the scope."""
        note = scope[NOTE] = RequestNote()
        status = 0

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            _done(self.recent, scope, note.model, status, start, note.waited)


def _replay(first: Message, receive: Receive) -> Receive:
    """``receive`` with ``first`` (already read) handed out again first."""
    pending: list[Message] = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


__all__ = ["HotPath"]
