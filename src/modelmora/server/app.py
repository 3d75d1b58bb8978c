"""``modelmora serve``: one manager behind a REST API, an OpenAI-compatible swapping proxy,
Prometheus metrics and a live status page.  In-process torch models live in this server,
so it is also how the CLI manages them remotely (``--url``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import events as ev
from ..config import ManagerConfig
from ..core import ModelManager
from ..errors import ModelMoraError
from ..spec import parse_duration
from .errors import APIError, api_error, handle_api_error, handle_modelmora_error, registered
from .metrics import Metrics
from .page import render_page
from .proxy import Proxy, router
from .security import Guard

_QUIET = (ev.LeaseAcquired, ev.LeaseReleased)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_alive: str | float | None = Field(
        None, description="Idle time before unload, e.g. '10m'; -1 = never."
    )
    pin: bool = Field(False, description="Keep it until unpinned or force-unloaded.")


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="Unload even while leased (closes the holders' handles).")


def event_to_dict(event: ev.Event) -> dict[str, Any]:
    data = dataclasses.asdict(event)
    data["kind"] = type(event).__name__
    data["text"] = ev.describe(event)
    return data


def create_app(
    manager: ModelManager | ManagerConfig | Mapping[str, Any] | str,
    *,
    token: str | None = None,
    queue_limit: int = 16,
    max_body: int = 1 << 20,
    proxy_timeout: float = 600.0,
    title: str = "modelmora",
) -> FastAPI:
    """The ASGI app; it enters the manager for its lifespan (uvicorn runs that)."""
    mm = manager if isinstance(manager, ModelManager) else ModelManager(manager)
    metrics = Metrics(mm)
    proxy = Proxy(mm, metrics, queue_limit=queue_limit, timeout=proxy_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with mm:
            yield
        await proxy.aclose()

    app = FastAPI(
        title="modelmora",
        summary="Keeps the right models resident: REST API, OpenAI-compatible swapping proxy, metrics.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.manager = mm
    app.add_middleware(Guard, token=token, max_body=max_body)
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(ModelMoraError, handle_modelmora_error)

    @app.get("/health", tags=["server"])
    async def health() -> JSONResponse:
        """200 ``ok``; 503 ``degraded`` while background work (reconcile, the reaper, a
        runtime's observe) keeps failing — the problems are listed."""
        problems = mm.problems()
        body: dict[str, Any] = {
            "status": "degraded" if problems else "ok",
            "models": len(mm.config.models),
            "loaded": mm.loaded(),
        }
        if problems:
            body["problems"] = problems
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return render_page(title)

    @app.get("/models", tags=["models"])
    async def models() -> list[dict[str, Any]]:
        out = []
        for name, spec in sorted(mm.config.models.items()):
            out.append(
                {
                    "name": name, "provider": spec.provider, "target": spec.target, "group": spec.group,
                    "memory": dict(spec.memory), "pinned": spec.pinned, "loaded": mm.is_loaded(name),
                    "leases": mm.leases(name), "default": name == mm.config.default_model,
                }
            )  # fmt: skip
        return out

    @app.get("/status", tags=["models"])
    async def status() -> dict[str, Any]:
        return (await mm.status()).to_dict()

    @app.post("/models/{name}/load", tags=["models"])
    async def load(name: str, body: LoadRequest | None = None) -> dict[str, Any]:
        body = body or LoadRequest()
        try:
            keep_alive = None if body.keep_alive is None else parse_duration(body.keep_alive)
        except ValueError as exc:
            raise api_error(422, f"keep_alive: {exc}", "invalid_keep_alive") from None
        handle = await mm.load(registered(mm, name), pin=body.pin, keep_alive=keep_alive)
        return {"model": name, "loaded": True, "memory": dict(handle.memory), "pinned": body.pin}

    @app.post("/models/{name}/unload", tags=["models"])
    async def unload(name: str, body: UnloadRequest | None = None) -> dict[str, Any]:
        body = body or UnloadRequest()
        return {"model": name, "unloaded": await mm.unload(registered(mm, name), force=body.force)}

    @app.post("/unload-all", tags=["models"])
    async def unload_all(body: UnloadRequest | None = None) -> dict[str, Any]:
        body = body or UnloadRequest()
        return dataclasses.asdict(await mm.unload_all(force=body.force))

    @app.get("/events", tags=["server"], response_class=StreamingResponse)
    async def events(request: Request, leases: bool = False) -> StreamingResponse:
        """Server-sent events, one JSON object per lifecycle transition."""
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](256)

        def on_event(event: ev.Event) -> None:
            if leases or not isinstance(event, _QUIET):
                # a slow reader misses events rather than slowing the manager down
                with contextlib.suppress(anyio.WouldBlock):
                    send.send_nowait(event_to_dict(event))

        unsubscribe = mm.events.subscribe(on_event)

        async def stream() -> AsyncIterator[str]:
            try:
                yield ": connected\n\n"
                while True:
                    with anyio.move_on_after(15) as idle:
                        item = await receive.receive()
                    if idle.cancelled_caught:
                        yield ": ping\n\n"
                        continue
                    yield f"data: {json.dumps(item, default=str)}\n\n"
            finally:
                unsubscribe()
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


__all__ = ["LoadRequest", "UnloadRequest", "create_app", "event_to_dict", "token_from_env"]
