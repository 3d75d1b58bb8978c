"""``modelmora serve``: one manager behind a REST API, an OpenAI-compatible swapping proxy,
Prometheus metrics and a live status page.  In-process torch models live in this server,
so it is also how the CLI manages them remotely (``--url``)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import events as ev
from ..config import ManagerConfig
from ..core import ModelManager
from ..errors import ModelMoraError
from ..spec import parse_duration
from .errors import (
    ERROR_RESPONSES,
    APIError,
    api_error,
    handle_api_error,
    handle_http_error,
    handle_internal_error,
    handle_modelmora_error,
    handle_validation_error,
    registered,
    resident_or_registered,
)
from .hot_path import HotPath
from .metrics import Metrics
from .page import render_page
from .proxy import Proxy, router
from .security import AUTHORISED, Guard, HostCheck, allowed_hosts

HISTORY = 50


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_alive: StrictStr | StrictFloat | None = Field(
        None, description="Idle time before unload: '10m' or seconds; -1 = never."
    )
    pin: bool = Field(False, description="Keep it until unpinned or force-unloaded.")


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="Unload even while leased (closes the holders' handles).")


def _links(pointer: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI links from an answer naming a model to loading and unloading it (clients and
    schemathesis' stateful tests follow them)."""
    name = {"name": f"$response.body#{pointer}"}
    return {
        200: {
            "links": {
                "LoadIt": {"operationId": "load_model", "parameters": name},
                "UnloadIt": {"operationId": "unload_model", "parameters": name},
            }
        }
    }


def event_to_dict(event: ev.Event) -> dict[str, Any]:
    data = dataclasses.asdict(event)
    data["kind"] = type(event).__name__
    data["text"] = ev.describe(event)
    return data


class EventStreams:
    """The open ``/events`` streams.  :meth:`end` (the server is stopping) closes each one's
    sending side, so its reader gets the events already queued and then the end of the
    stream; a stream opened after it ends at once.  Without it the status page held a
    stopping server until the browser went away."""

    def __init__(self) -> None:
        self.senders: set[MemoryObjectSendStream[dict[str, Any]]] = set()
        self.ended = False

    def add(self, send: MemoryObjectSendStream[dict[str, Any]]) -> None:
        self.senders.add(send)
        if self.ended:
            send.close()

    def end(self) -> None:
        self.ended = True
        for send in list(self.senders):
            send.close()


class _App(FastAPI):
    """FastAPI with modelmora's security checks and the proxy's hot path in front of
    FastAPI's own outer layers (its error and telemetry middleware, the router): a proxied
    request for a resident model is checked and answered without them, which took ~0.1 ms
    of CPU a request off the proxy (``benchmarks/bench_llamacpp_router.py``).  Everything
    else passes the same checks and then goes through FastAPI unchanged.  An exception in
    the checks or the hot path is answered 500 in the API's shape, as FastAPI would."""

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is not None and scope["type"] in ("http", "websocket"):
            await self.front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def inner(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI itself, behind the checks."""
        await super().__call__(scope, receive, send)


def create_app(
    manager: ModelManager | ManagerConfig | Mapping[str, Any] | str,
    *,
    token: str | None = None,
    queue_limit: int = 16,
    max_body: int = 1 << 20,
    proxy_timeout: float = 600.0,
    title: str = "modelmora",
    read_timeout: float = 30.0,
    allow_hosts: Sequence[str] = (),
    allow_origins: Sequence[str] = (),
    enter_manager: bool = True,
) -> FastAPI:
    """The ASGI app; it enters the manager for its lifespan (uvicorn runs that).

    Without a ``token`` it answers only to loopback host names and ``allow_hosts``; web
    pages from ``allow_origins`` may call it (CORS), others cannot change its state (see
    :mod:`modelmora.server.security`).  Run it with :func:`server_options` so slow headers
    are cut off too.  ``enter_manager=False``: the caller runs the manager (``modelmora
    serve`` starts it before uvicorn, so startup errors are its own one line)."""
    mm = manager if isinstance(manager, ModelManager) else ModelManager(manager)
    metrics = Metrics(mm)
    proxy = Proxy(mm, metrics, queue_limit=queue_limit, timeout=proxy_timeout, max_body=max_body)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            if enter_manager:
                async with mm:
                    yield
            else:
                yield
        finally:
            await proxy.aclose()

    app = _App(
        title="modelmora",
        summary="Keeps the right models resident: REST API, OpenAI-compatible swapping proxy, metrics.",
        version="0.1.0",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    app.state.manager = mm
    streams = app.state.event_streams = EventStreams()
    # the recent lifecycle events, sent first to each new /events client (the status page
    # opened after a load still shows it)
    history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
    mm.events.subscribe(lambda e: history.append(event_to_dict(e)), leases=False)
    # in front of everything FastAPI does: the host check, then CORS preflights, then the
    # guard, then the proxy's hot path (behind every check, in front of FastAPI's own layers)
    front: ASGIApp = HotPath(app.inner, proxy)
    front = Guard(
        front, token=token, max_body=max_body, read_timeout=read_timeout, allow_origins=allow_origins
    )
    if allow_origins:
        front = CORSMiddleware(
            front, allow_origins=list(allow_origins), allow_methods=["*"], allow_headers=["*"]
        )
    front = HostCheck(front, allowed_hosts(token, allow_hosts))
    # a bug in the checks or the hot path is answered as FastAPI answers any other (JSON)
    app.front = ServerErrorMiddleware(front, handler=handle_internal_error)
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(ModelMoraError, handle_modelmora_error)
    app.add_exception_handler(Exception, handle_internal_error)

    @app.get(
        "/health",
        tags=["server"],
        responses={503: {"description": "degraded: background work (reconcile, the reaper) keeps failing"}},
    )
    async def health(request: Request) -> JSONResponse:
        """Liveness; never needs the token.  200 ``ok``; 503 ``degraded`` while background
        work (reconcile, the reaper, a runtime's observe) keeps failing.  Without the token
        it names no models and lists no problems (their texts may name models)."""
        problems = mm.problems()
        code = 503 if problems else 200
        body: dict[str, Any] = {"status": "degraded" if problems else "ok"}
        if not request.scope.get(AUTHORISED, True):
            return JSONResponse(body, status_code=code)
        body |= {"models": len(mm.config.models), "loaded": mm.loaded()}
        if problems:
            body["problems"] = problems
        return JSONResponse(body, status_code=code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return render_page(title)

    @app.get("/models", tags=["models"], operation_id="list_models", responses=_links("/0/name"))
    async def models() -> list[dict[str, Any]]:
        out = []
        placed = {m.name: m for m in (await mm.status()).models}  # where each one is, and why
        for name, spec in sorted(mm.config.models.items()):
            row = placed.get(name)
            out.append(
                {
                    "name": name, "provider": spec.provider, "target": spec.target, "group": spec.group,
                    "memory": dict(spec.memory), "pinned": spec.pinned, "loaded": mm.is_loaded(name),
                    "leases": mm.leases(name), "default": name == mm.config.default_model,
                    "device": spec.device, "gpus": spec.gpus,
                    "devices": row.devices if row else [], "placement": row.placement if row else "",
                }
            )  # fmt: skip
        return out

    @app.get("/status", tags=["models"], operation_id="status", responses=_links("/models/0/name"))
    async def status() -> dict[str, Any]:
        return (await mm.status()).to_dict()

    @app.get("/hardware", tags=["server"], operation_id="hardware")
    async def hardware() -> dict[str, Any]:
        """The devices from a fresh reading (NVML, torch.cuda or psutil), bytes throughout:
        per device its total, what other processes hold (and NVML's per-process use), what
        modelmora's models hold, the reserve, the budget and its source, and what a load
        may still take."""
        return (await mm.hardware()).to_dict()

    # {name:path}: registry names may contain "/" (team/llm, adopted ollama/qwen2.5:14b)
    @app.post(
        "/models/{name:path}/load", tags=["models"], operation_id="load_model", responses=_links("/model")
    )
    async def load(name: str, body: LoadRequest | None = None) -> dict[str, Any]:
        body = body or LoadRequest()
        try:
            keep_alive = None if body.keep_alive is None else parse_duration(body.keep_alive)
        except ValueError as exc:
            raise api_error(422, f"keep_alive: {exc}", "invalid_keep_alive", param="keep_alive") from None
        handle = await mm.load(registered(mm, name), pin=body.pin, keep_alive=keep_alive)
        return {"model": name, "loaded": True, "memory": dict(handle.memory), "pinned": body.pin}

    @app.post(
        "/models/{name:path}/unload", tags=["models"], operation_id="unload_model", responses=_links("/model")
    )
    async def unload(name: str, body: UnloadRequest | None = None) -> dict[str, Any]:
        body = body or UnloadRequest()
        name = resident_or_registered(mm, name)
        return {"model": name, "unloaded": await mm.unload(name, force=body.force)}

    @app.post("/unload-all", tags=["models"])
    async def unload_all(body: UnloadRequest | None = None) -> dict[str, Any]:
        body = body or UnloadRequest()
        return dataclasses.asdict(await mm.unload_all(force=body.force))

    @app.get("/events", tags=["server"], response_class=StreamingResponse)
    async def events(request: Request, leases: bool = False) -> StreamingResponse:
        """Server-sent events, one JSON object per lifecycle transition; the recent ones
        (up to 50, marked ``"history": true``) come first."""
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](256 + HISTORY)
        for past in list(history):  # no await before subscribing: nothing falls in between
            send.send_nowait({**past, "history": True})

        def on_event(event: ev.Event) -> None:
            # a slow reader misses events rather than slowing the manager down; after the
            # server has ended the stream, none are sent
            with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
                send.send_nowait(event_to_dict(event))

        # lease events only for a client that asks for them: built for nobody else
        unsubscribe = mm.events.subscribe(on_event, leases=leases)
        streams.add(send)

        async def stream() -> AsyncIterator[str]:
            try:
                yield ": connected\n\n"
                while True:
                    with anyio.move_on_after(15) as idle:
                        try:
                            item = await receive.receive()
                        except anyio.EndOfStream:  # the server is stopping
                            return
                    if idle.cancelled_caught:
                        yield ": ping\n\n"
                        continue
                    yield f"data: {json.dumps(item, default=str)}\n\n"
            finally:
                unsubscribe()
                streams.senders.discard(send)
                send.close()
                receive.close()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(proxy.waiting), media_type="text/plain; version=0.0.4")

    app.include_router(router(proxy))
    return app


def token_from_env() -> str | None:
    return os.environ.get("MODELMORA_TOKEN") or None


__all__ = ["EventStreams", "LoadRequest", "UnloadRequest", "create_app", "event_to_dict", "token_from_env"]
