"""Issue 25, item 4: clients that left cost nothing.

The failure, as a user met it: a client gives up on a slow cold load; its request stays
queued, is forwarded once the model is up (the runtime answers nobody), and the load runs
to its end although nobody waits for it, so the next client, asking for the other model
of the same exclusive group, waits for the whole unwanted cold start plus the swap.

The app is driven as uvicorn drives it (plain ASGI) so the client's disconnect is an
event the test sets, and the runtime is :class:`FaultyProvider` whose loads the test holds:
everything is decided by ordering and events, nothing by timing.  ``fail_after`` is only a
guard against a hang (it is what the old code ran into)."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from modelmora import ModelManager
from modelmora import events as ev
from modelmora.memory import StaticProbe
from modelmora.providers.base import Handle
from modelmora.server import create_app
from modelmora.spec import ModelSpec
from modelmora.testing.faulty import FaultyProvider
from modelmora.testing.threaded import ThreadedServer

pytestmark = pytest.mark.anyio

GUARD = 20.0  # seconds: only against a hang


class Upstream:
    """An OpenAI-style runtime that records the model of every request it receives, and
    whether a streamed answer was cut before its end."""

    def __init__(self) -> None:
        self.models: list[str] = []
        self.cut = threading.Event()
        self.streaming = threading.Event()
        self.words = 200

        async def chat(request: Request) -> Any:
            body = await request.json()
            self.models.append(body["model"])
            if not body.get("stream"):
                return JSONResponse({"model": body["model"], "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})  # fmt: skip

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    for i in range(self.words):
                        delta = {
                            "model": body["model"],
                            "choices": [{"index": 0, "delta": {"content": f"w{i} "}}],
                        }
                        yield f"data: {json.dumps(delta)}\n\n".encode()
                        self.streaming.set()
                        await anyio.sleep(0.05)
                    yield b"data: [DONE]\n\n"
                except BaseException:
                    self.cut.set()
                    raise

            return StreamingResponse(chunks(), media_type="text/event-stream")

        self.app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


class EndpointFaulty(FaultyProvider):
    """The faulty runtime, its models answering at ``endpoint``."""

    def __init__(self, endpoint: str):
        super().__init__()
        self.endpoint = endpoint

    async def load(self, spec: ModelSpec) -> Handle:
        handle = await super().load(spec)
        handle.endpoint, handle.api = self.endpoint, "openai"
        return handle


class Client:
    """One HTTP client as uvicorn presents it to the app: its body, then (once :meth:`leave`
    is called) ``http.disconnect``."""

    def __init__(self, app: Any, body: dict[str, Any], headers: dict[str, str] | None = None):
        self.app = app
        self.raw = json.dumps(body).encode()
        self.headers = headers or {}
        self.gone = anyio.Event()
        self.done = anyio.Event()
        self.messages: list[dict[str, Any]] = []
        self.first_byte = anyio.Event()

    def leave(self) -> None:
        self.gone.set()

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.messages if m["type"] == "http.response.start"), None)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    async def run(self) -> None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": self.raw, "more_body": False}
            await self.gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if self.gone.is_set():
                raise OSError("the client has gone")
            self.messages.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                self.first_byte.set()

        headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        headers.append((b"content-length", str(len(self.raw)).encode()))
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8765), "state": {},
        }  # fmt: skip
        try:
            await self.app(scope, receive, send)
        except OSError:
            pass  # what uvicorn does with a send to a client that left
        finally:
            self.done.set()


def chat(model: str, *, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def upstream() -> Iterator[tuple[Upstream, str]]:
    runtime = Upstream()
    with ThreadedServer(runtime.app, lifespan="off") as server:
        yield runtime, server.url


def group_manager(faulty: FaultyProvider) -> ModelManager:
    """Two models of one exclusive group on the faulty runtime, no background work."""
    model = {"provider": "faulty", "memory": "1GB", "device": "cpu", "group": "g"}
    config = {
        "budgets": {"cpu": "4GB"}, "reaper_interval": 3600, "reconcile_interval": 3600,
        "watchdog": {"interval": 3600}, "models": {"a": dict(model), "b": dict(model)},
    }  # fmt: skip
    return ModelManager(config, providers={"faulty": faulty}, probe=StaticProbe({}))


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await anyio.sleep(0.01)


def kinds(events: list[ev.Event], model: str) -> list[str]:
    return [type(e).__name__ for e in events if getattr(e, "model", None) == model]


async def test_a_client_that_left_during_a_cold_load_costs_the_next_client_nothing(
    upstream: tuple[Upstream, str],
) -> None:
    """The issue's failure: A leaves while ``a`` loads; the load is stopped (not run to its
    end), A's request is never forwarded, and B's request for ``b`` of the same group is
    served while A's load would still be running (its gate is never opened)."""
    runtime, url = upstream
    faulty = EndpointFaulty(url)
    mm = group_manager(faulty)
    events: list[ev.Event] = []
    mm.events.subscribe(events.append)
    app: Any = create_app(mm, enter_manager=False)
    faulty.hold("load", "a")  # a slow cold start: it ends only when the test says so
    async with mm, app.router.lifespan_context(app), anyio.create_task_group() as tg:
        a = Client(app, chat("a"))
        tg.start_soon(a.run)
        with anyio.fail_after(GUARD):
            await faulty.wait_pending("load", "a")
            a.leave()
            await a.done.wait()
            await until(lambda: "LoadAbandoned" in kinds(events, "a"))
            b = Client(app, chat("b"))
            await b.run()
        assert b.status == 200, b.body
        loads_of_a = [c.outcome for c in faulty.calls if c.op == "load" and c.target == "a"]
        assert loads_of_a == ["cancelled"], faulty.describe()
        assert runtime.models == ["b"], "a request whose client left was forwarded"
        assert not mm.is_loaded("a") and mm.is_loaded("b")
        order = [type(e).__name__ + ":" + getattr(e, "model", "") for e in events]
        assert order.index("LoadAbandoned:a") < order.index("Loading:b"), order


async def test_a_client_that_left_while_queued_for_memory_is_never_forwarded(
    upstream: tuple[Upstream, str],
) -> None:
    """A waits for ``a`` while a lease holds ``b`` (same group); A leaves; the lease ends.
    ``a`` is never loaded (nobody wants it) and nothing is forwarded."""
    runtime, url = upstream
    faulty = EndpointFaulty(url)
    mm = group_manager(faulty)
    events: list[ev.Event] = []
    mm.events.subscribe(events.append)
    app: Any = create_app(mm, enter_manager=False)
    async with mm, app.router.lifespan_context(app), anyio.create_task_group() as tg:
        lease = mm.use("b")
        await lease.__aenter__()
        a = Client(app, chat("a"))
        tg.start_soon(a.run)
        with anyio.fail_after(GUARD):
            await until(lambda: "Waiting" in kinds(events, "a"))
            a.leave()
            await anyio.wait_all_tasks_blocked()
            lease.release()
            await a.done.wait()
            await until(lambda: mm.leases("b") == 0 and not mm.leases("a"))
        assert not [c for c in faulty.calls if c.op == "load" and c.target == "a"], faulty.describe()
        assert runtime.models == [], "a request whose client left was forwarded"
        assert "LoadAbandoned" in kinds(events, "a")


async def test_a_streamed_answer_whose_client_left_is_cut_upstream(upstream: tuple[Upstream, str]) -> None:
    """The runtime stops generating for a client that left mid-stream: its stream is cut."""
    runtime, url = upstream
    faulty = EndpointFaulty(url)
    mm = group_manager(faulty)
    app: Any = create_app(mm, enter_manager=False)
    async with mm, app.router.lifespan_context(app), anyio.create_task_group() as tg:
        a = Client(app, chat("a", stream=True))
        tg.start_soon(a.run)
        with anyio.fail_after(GUARD):
            await a.first_byte.wait()
            a.leave()
            await a.done.wait()
        assert await anyio.to_thread.run_sync(runtime.cut.wait, GUARD), "the runtime kept generating"
        assert b"[DONE]" not in a.body
        assert mm.leases("a") == 0
