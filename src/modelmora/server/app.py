"""``modelmora serve``: one manager behind a REST API, an OpenAI-compatible swapping proxy,
Prometheus metrics and a live status page.  In-process torch models live in this server,
so it is also how the CLI manages them remotely (``--url``)."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
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
from ..errors import HeldByLeases, InsufficientMemory, ModelMoraError, ModelMoraTimeout
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
from .leases import HttpLeases
from .metrics import Metrics
from .page import render_page
from .proxy import Proxy, router
from .recent import RecentRequests, RequestRecord
from .security import AUTHORISED, ApiKey, Guard, HostCheck, allowed_hosts, api_keys

HISTORY = 50


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_alive: StrictStr | StrictFloat | None = Field(
        None, description="Idle time before unload: '10m' or seconds; -1 = never."
    )
    pin: bool = Field(False, description="Keep it until unpinned or force-unloaded.")


class LeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="The registry model to hold.")
    holder: str = Field(min_length=1, max_length=200, description="Who holds it: a job, an agent, a user.")
    reason: str = Field("", max_length=500, description="Why, for whoever it blocks.")
    ttl: StrictStr | StrictFloat = Field(
        "1h", description="How long it lasts: '30m' or seconds, at most the server's lease cap."
    )


class ExtendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl: StrictStr | StrictFloat = Field(description="The lease now ends this long from now.")


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
    keys: Sequence[ApiKey] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    max_lease: float = 24 * 3600.0,
    progress_after: float = 1.0,
) -> FastAPI:
    """The ASGI app; it enters the manager for its lifespan (uvicorn runs that).

    Without a ``token`` it answers only to loopback host names and ``allow_hosts``; web
    pages from ``allow_origins`` may call it (CORS), others cannot change its state (see
    :mod:`modelmora.server.security`).  Run it with :func:`server_options` so slow headers
    are cut off too.  ``enter_manager=False``: the caller runs the manager (``modelmora
    serve`` starts it before uvicorn, so startup errors are its own one line).  ``keys``:
    the API keys (default: the config's ``api_keys``, secrets from the environment).
    ``state_dir`` keeps the leases over HTTP across restarts (default
    ``$MODELMORA_HOME/server``); ``max_lease`` caps their length (seconds);
    ``progress_after``: seconds a streaming request waits before its stream opens with
    progress comments."""
    mm = manager if isinstance(manager, ModelManager) else ModelManager(manager)
    if keys is None:
        keys = api_keys(mm.config, os.environ)
    metrics = Metrics(mm)
    proxy = Proxy(
        mm, metrics, queue_limit=queue_limit, timeout=proxy_timeout, max_body=max_body,
        progress_after=progress_after,
    )  # fmt: skip
    home = Path(os.environ.get("MODELMORA_HOME") or Path.home() / ".cache" / "modelmora")
    held = HttpLeases(mm, Path(state_dir) if state_dir is not None else home / "server", max_ttl=max_lease)
    proxy.leases = held

    @asynccontextmanager
    async def running() -> AsyncIterator[None]:
        restored = held.restore()
        async with anyio.create_task_group() as tg:
            tg.start_soon(held.grant_restored, restored)
            tg.start_soon(held.run)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                held.close()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            if enter_manager:
                async with mm, running():
                    yield
            else:
                async with running():
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
    app.state.proxy = proxy
    app.state.leases = held
    streams = app.state.event_streams = EventStreams()
    # the recent lifecycle events, sent first to each new /events client (the status page
    # opened after a load still shows it)
    history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)

    def queue_of(model: str) -> dict[str, Any]:
        """A model's waiting requests and the state of its load: what ``GET /models/{name}``
        and each ``/events`` event about it carry (seconds)."""
        estimate = proxy.loads.estimate(model) if model in mm.config.models else {}
        return {"waiting": len(proxy.requests.waiting(model)), **estimate}

    def described(event: ev.Event) -> dict[str, Any]:
        data = event_to_dict(event)
        if data.get("model"):
            data["queue"] = queue_of(data["model"])
        return data

    mm.events.subscribe(lambda e: history.append(described(e)), leases=False)
    # in front of everything FastAPI does: the host check, then CORS preflights, then the
    # guard, then the proxy's hot path (behind every check, in front of FastAPI's own layers)
    recent = app.state.recent_requests = RecentRequests()
    front: ASGIApp = HotPath(app.inner, proxy, recent)
    front = Guard(
        front,
        token=token,
        max_body=max_body,
        read_timeout=read_timeout,
        allow_origins=allow_origins,
        keys=keys,
    )
    if allow_origins:
        front = CORSMiddleware(
            front, allow_origins=list(allow_origins), allow_methods=["*"], allow_headers=["*"]
        )
    # any bearer secret (the token or an API key) lets the server answer to any host name
    front = HostCheck(front, allowed_hosts(token if token is not None or not keys else "", allow_hosts))
    # a bug in the checks or the hot path is answered as FastAPI answers any other (JSON)
    app.front = ServerErrorMiddleware(front, handler=handle_internal_error)
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)

    async def handle_core_error(request: Request, exc: Exception) -> Response:
        """The core's errors; a load refused or timed out while HTTP leases hold other
        models names those leases (holder, reason, time left)."""
        if (
            isinstance(exc, InsufficientMemory | ModelMoraTimeout)
            and not isinstance(exc, HeldByLeases)
            and exc.model
        ):
            named = held.named_in(exc.model)
            if named:  # a copy: the error may be shared by every waiter of one load
                exc = copy.copy(exc)
                exc.message += named
        return await handle_modelmora_error(request, exc)

    app.add_exception_handler(ModelMoraError, handle_core_error)
    app.add_exception_handler(Exception, handle_internal_error)

    @app.get(
        "/health",
        tags=["server"],
        responses={503: {"description": "degraded: background work (reconcile, the reaper) keeps failing"}},
    )
    async def health(request: Request) -> JSONResponse:
        """Liveness; never needs the token.  200 ``ok``; 503 ``degraded`` while background
        work (reconcile, the reaper, a runtime's observe) keeps failing or a provider's
        runtime is unreachable (``outages``: which, since when, when it is asked again).  Without the token
        it names no models and lists no problems (their texts may name models)."""
        problems, outages = mm.problems(), mm.outages()
        code = 503 if problems or outages else 200
        body: dict[str, Any] = {"status": "degraded" if code == 503 else "ok"}
        if not request.scope.get(AUTHORISED, True):
            return JSONResponse(body, status_code=code)
        body |= {"models": len(mm.config.models), "loaded": mm.loaded()}
        if problems:
            body["problems"] = problems
        if outages:  # providers whose runtime is down: since when (UTC), until
            now = time.time()
            body["outages"] = {
                name: {
                    "since": datetime.fromtimestamp(now - o["down_s"], UTC).isoformat(timespec="seconds"),
                    "down_s": round(o["down_s"], 1),
                    "retry_in_s": round(o["retry_in_s"], 1),
                    "error": o["error"],
                }
                for name, o in outages.items()
            }
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

    @app.get("/models/{name:path}", tags=["models"], operation_id="get_model", responses=_links("/name"))
    async def model(name: str) -> dict[str, Any]:
        """One model: its registry row, residency, leases (HTTP ones named), and its queue —
        requests waiting (with each one's position) and the load under way with its ETA."""
        spec = mm.config.models[registered(mm, name)]
        entry = next((e for e in mm.entries() if e.name == name), None)
        now = held.clock()
        waiting = proxy.requests.waiting(name)
        return {
            "name": name, "provider": spec.provider, "target": spec.target, "group": spec.group,
            "memory": dict(spec.memory), "state": entry.state.value if entry else "unloaded",
            "loaded": mm.is_loaded(name), "leases": mm.leases(name),
            "http_leases": [h.to_dict(now) for h in held.leases.values() if h.model == name],
            "queue": {
                **queue_of(name),
                "requests": [{"id": r.id, "position": proxy.requests.position(r)} for r in waiting],
            },
        }  # fmt: skip

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

    @app.post(
        "/models/{name:path}/unpin", tags=["models"], operation_id="unpin_model", responses=_links("/model")
    )
    async def unpin(name: str) -> dict[str, Any]:
        """Let a pinned model go again like any other (its keep-alive, eviction); loads
        nothing.  Pin with ``POST /models/{name}/load {"pin": true}``."""
        name = resident_or_registered(mm, name)
        mm.unpin(name)
        return {"model": name, "pinned": False}

    @app.post("/unload-all", tags=["models"])
    async def unload_all(body: UnloadRequest | None = None) -> dict[str, Any]:
        body = body or UnloadRequest()
        return dataclasses.asdict(await mm.unload_all(force=body.force))

    @app.get("/events", tags=["server"], response_class=StreamingResponse)
    async def events(request: Request, leases: bool = False, requests: bool = False) -> StreamingResponse:
        """Server-sent events, one JSON object per lifecycle transition; the recent ones
        (up to 50, marked ``"history": true``) come first.  ``requests=true`` adds one
        ``"kind": "Request"`` object per proxied request once it has ended (model, route,
        status, ``duration_s``, ``waited_s``), the last 100 of them replayed first."""
        replayed = list(history) + ([r.to_dict() for r in recent] if requests else [])
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](256 + len(replayed))
        for past in replayed:  # no await before subscribing: nothing falls in between
            send.send_nowait({**past, "history": True})

        def on_event(event: ev.Event) -> None:
            # a slow reader misses events rather than slowing the manager down; after the
            # server has ended the stream, none are sent
            with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
                send.send_nowait(described(event))

        # lease events only for a client that asks for them: built for nobody else
        unsubscribe = mm.events.subscribe(on_event, leases=leases)
        stop_requests = None
        if requests:

            def on_request(record: RequestRecord) -> None:
                with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
                    send.send_nowait(record.to_dict())

            stop_requests = recent.subscribe(on_request)
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
                if stop_requests is not None:
                    stop_requests()
                streams.senders.discard(send)
                send.close()
                receive.close()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def parse_ttl(raw: str | float) -> float:
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise api_error(422, f"ttl: {exc}", "invalid_ttl", param="ttl") from None

    @app.post("/leases", tags=["leases"], operation_id="take_lease")
    async def take_lease(body: LeaseRequest) -> dict[str, Any]:
        """Hold a model for a piece of work, as ``manager.use()`` does: loaded if needed,
        never evicted while held; ends after ``ttl`` unless extended or released.  409/503
        when its memory cannot be had, naming the leases that hold it."""
        registered(mm, body.model)
        lease = await held.take(body.model, body.holder, body.reason, parse_ttl(body.ttl))
        return lease.to_dict(held.clock())

    @app.get("/leases", tags=["leases"], operation_id="list_leases")
    async def list_leases() -> list[dict[str, Any]]:
        now = held.clock()
        return [h.to_dict(now) for h in held.leases.values()]

    @app.get("/leases/{lease_id}", tags=["leases"], operation_id="get_lease")
    async def get_lease(lease_id: str) -> dict[str, Any]:
        return held.get(lease_id).to_dict(held.clock())

    @app.post("/leases/{lease_id}/extend", tags=["leases"], operation_id="extend_lease")
    async def extend_lease(lease_id: str, body: ExtendRequest) -> dict[str, Any]:
        return held.extend(lease_id, parse_ttl(body.ttl)).to_dict(held.clock())

    @app.delete("/leases/{lease_id}", tags=["leases"], operation_id="release_lease")
    async def release_lease(lease_id: str) -> dict[str, Any]:
        return {**held.release(lease_id).to_dict(held.clock()), "released": True}

    @app.get("/requests", tags=["requests"], operation_id="list_requests")
    async def list_requests() -> list[dict[str, Any]]:
        """The proxy's in-flight requests, first come first: model, key, state (``queued``,
        ``loading``, ``forwarded``), seconds waited, position in its model's queue."""
        return [proxy.requests.describe(r, proxy.state_of(r)) for r in proxy.requests]

    @app.post("/requests/{request_id}/cancel", tags=["requests"], operation_id="cancel_request")
    async def cancel_request(request_id: str) -> dict[str, Any]:
        """A waiting request leaves its queue unanswered (never forwarded); a forwarded one
        has its answer cut.  404 when no such request is in flight."""
        found = proxy.requests.cancel(request_id)
        if found is None:
            raise api_error(404, f"no request {request_id!r} in flight", "request_not_found")
        return {"id": request_id, "cancelled": True}

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(proxy.waiting), media_type="text/plain; version=0.0.4")

    app.include_router(router(proxy))
    return app


def token_from_env() -> str | None:
    return os.environ.get("MODELMORA_TOKEN") or None


__all__ = ["EventStreams", "LoadRequest", "UnloadRequest", "create_app", "event_to_dict", "token_from_env"]
