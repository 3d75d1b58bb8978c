"""The OpenAI-compatible swapping proxy.

Tools that speak OpenAI's API point at ``http://box:8765/v1``; the ``model`` field picks a
registry model.  Each request takes a lease (loading the model, waiting in line when
leases hold the memory), forwards to the runtime's own OpenAI endpoint with the model
renamed to what the runtime calls it, passes the answer through (streaming included; its
top-level ``"model"`` renamed back to the name asked for, see :class:`ModelRenamer`) and
releases the lease when the last byte is out.  ``keep_alive`` (a body field
or the ``X-Keep-Alive`` header, which Ollama's own OpenAI endpoint lacks) says how long the
model stays afterwards.  In-process embedding models answer ``/v1/embeddings`` here.

The runtime is called with aiohttp (C-accelerated HTTP parsing), not httpx: on this path
every request pays the client's cost, and aiohttp's is about 0.8 ms lower per request
(measured with ``benchmarks/bench_llamacpp_router.py``'s proxy-overhead table).  A
non-streaming request for a model that is ready takes :meth:`Proxy.hot`, which answers
below FastAPI's routing and validation layers (see :mod:`modelmora.server.hot_path`) and
calls the runtime through :class:`~modelmora.server.upstream.UpstreamPool`, a lean
keep-alive pool for that one request shape (aiohttp's own cost was most of what remained).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictStr, ValidationError
from starlette.types import Message, Receive, Scope, Send

from ..core import Lease, ModelManager, State
from ..errors import ModelMoraError
from ..providers.base import Handle
from ..spec import OPENAI_ENDPOINTS, PRIORITIES, ModelSpec, parse_duration
from .errors import APIError, api_error, error_body, http_status, openai_error, registered
from .metrics import Metrics
from .progress import LoadClock, progress_line
from .requests import InFlight, Requests, disconnected, unless
from .security import API_KEY, ApiKey
from .upstream import UpstreamError, UpstreamPool

# what a request whose client left (or that was cancelled) is answered: nginx's "client
# closed request", never seen by the client, but counted and logged
CLIENT_GONE = 499


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    stream: bool = False
    keep_alive: StrictStr | StrictFloat | None = Field(
        None, description="modelmora extension: how long the model stays loaded after this request."
    )


class ChatRequest(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]]


# the proxied routes (path below /v1/) and the body each takes
ROUTES: dict[str, type[_Body]] = {
    "chat/completions": ChatRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
}

_UNDER_WAY = (State.LOADING, State.WAKING)

# seconds /v1/models waits for runtimes to say what their models serve (Ollama's /api/show,
# once per model); a runtime that is down limits nothing rather than holding the list up
SERVES_TIMEOUT = 2.0

# the headers that describe the body, which is passed through as the runtime sent it
_ENTITY_HEADERS = frozenset(
    {"content-type", "content-encoding", "content-language", "content-disposition", "cache-control", "vary"}
)
# the hot path also passes the runtime's length (the bytes are the same); without one the
# answer goes out chunked
_PASSED_HEADERS_B = frozenset(h.encode() for h in _ENTITY_HEADERS | {"content-length"})


# the scope key of a proxied request's :class:`RequestNote` (set where requests are logged)
NOTE = "modelmora.request"


@dataclasses.dataclass(slots=True)
class RequestNote:
    """What the request log says of a proxied request beyond its method, path and status: the
    model asked for, and how long it waited for that model to be ready (None: it was)."""

    model: str = "-"
    waited: float | None = None


class Proxy:
    """Requests that find their model not ready wait for it, within two bounds:

    * at most ``queue_limit`` per model whose load has not started: those are the requests
      that decide the next swap.  Requests for a model whose load is already under way join
      it: they cause no swap and wait only for that load, so refusing them would only make
      clients retry and the group swap back and forth (issue 16, item 10);
    * the memory they hold: waiting bodies total at most ``queue_limit × max_body`` bytes.
    """

    def __init__(
        self,
        manager: ModelManager,
        metrics: Metrics,
        *,
        queue_limit: int,
        timeout: float,
        max_body: int = 1 << 20,
        progress_after: float = 1.0,
        progress_every: float = 2.0,
    ):
        self.manager = manager
        self.requests = Requests()
        self.loads = LoadClock(manager)
        # a streaming request that has waited progress_after seconds gets its 200 and an
        # SSE comment line every progress_every seconds until its model is ready
        self.progress_after = progress_after
        self.progress_every = progress_every
        self.leases: Any = None  # the server's HTTP leases (``X-Modelmora-Lease``), set by the app
        self.metrics = metrics
        self.queue_limit = queue_limit
        self.queue_bytes = queue_limit * max_body
        self.queued: collections.Counter[str] = collections.Counter()  # waiting requests per model
        self.queued_bytes = 0
        self.timeout = timeout
        self._client: aiohttp.ClientSession | None = None
        self.upstream = UpstreamPool(timeout)  # the hot path's runtime connections

    @property
    def waiting(self) -> int:
        return sum(self.queued.values())

    @property
    def client(self) -> aiohttp.ClientSession:
        """One connection pool to the runtimes (made on first use: it needs the running loop).
        Bodies pass through as the runtime sent them, compressed or not."""
        if self._client is None:
            # connect: waiting for a pooled connection included; sock_read: between bytes
            timeout = aiohttp.ClientTimeout(
                total=None, connect=self.timeout, sock_connect=10.0, sock_read=self.timeout
            )
            self._client = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._client

    async def aclose(self) -> None:
        self.loads.unsubscribe()
        self.upstream.close()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def _keep_alive(self, body: _Body, header: str | None) -> float | None:
        raw = body.keep_alive if body.keep_alive is not None else header
        if raw is None:
            return None
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise api_error(400, f"keep_alive: {exc}", "invalid_keep_alive", param="keep_alive") from None

    def _load_under_way(self, name: str) -> bool:
        """Admitted and loading (or waking): it will be ready without another swap."""
        return any(e.name == name and e.state in _UNDER_WAY for e in self.manager.entries())

    def _who(self, request: Request, name: str) -> tuple[int | None, ApiKey | None]:
        """The request's priority and API key: ``X-Priority`` (an integer; with a key, at
        most the key's priority), else the key's, else None (the model's own); 403 for a
        model the key may not use."""
        key: ApiKey | None = request.scope.get(API_KEY)
        if key is not None and key.models is not None and name not in key.models:
            self.metrics.count_request(name, 403)
            raise api_error(
                403, f"API key {key.name!r} may not use {name!r}", "model_not_allowed", param="model"
            )
        raw = request.headers.get("x-priority")
        if raw is None:
            return (key.priority if key is not None else None), key
        try:
            priority = int(raw.strip())
        except ValueError:
            priority = None
        low, high = PRIORITIES
        if priority is None or not low <= priority <= high:
            self.metrics.count_request(name, 400)
            raise api_error(
                400, f"X-Priority: {raw[:40]!r} is not an integer from {low} to {high}", "invalid_priority"
            )
        return (min(priority, key.priority) if key is not None else priority), key

    async def _lease(
        self,
        name: str,
        keep_alive: float | None,
        size: int,
        note: RequestNote | None = None,
        priority: int | None = None,
        key: ApiKey | None = None,
    ) -> tuple[Lease, Handle]:
        """A lease, queueing while the model is not ready; 503 + Retry-After past the limits
        (429 from the model's own back-pressure, :class:`~modelmora.errors.Overloaded`).
        ``note`` learns how long it waited."""
        ready = self.manager.is_loaded(name) and not self.manager.is_parked(name)
        lease = self.manager.use(
            name,
            keep_alive=keep_alive,
            priority=priority,
            key=key.name if key is not None else None,
            weight=key.weight if key is not None else 1.0,
        )
        if ready:
            return lease, await lease.__aenter__()
        self._check_queue(name, size)
        self.queued[name] += 1
        self.queued_bytes += size
        start = time.perf_counter()
        try:
            return lease, await lease.__aenter__()
        finally:
            self.queued[name] -= 1
            self.queued_bytes -= size
            if note is not None:
                note.waited = time.perf_counter() - start

    def _check_queue(self, name: str, size: int) -> None:
        """503 + Retry-After when one more waiting request would pass the queue's limits."""
        if self.queued[name] >= self.queue_limit and not self._load_under_way(name):
            why = f"{self.queued[name]} requests already wait for {name!r}"
        elif self.queued_bytes + size > self.queue_bytes:
            why = f"waiting requests already hold {self.queued_bytes} bytes"
        else:
            return
        self.metrics.count_request(name, 503)
        raise api_error(503, f"{why}; try again shortly", "queue_full", retry_after=5)

    async def routes(self, spec: ModelSpec) -> frozenset[str] | None:
        """The routes below ``/v1/`` the model answers: what the registry declares
        (``serves:``) within what its provider says; None when neither limits them (the
        runtime decides).  A provider that cannot say now limits nothing: the lease reports
        why it is unavailable."""
        declared = None if spec.serves is None else frozenset(OPENAI_ENDPOINTS[s] for s in spec.serves)
        if spec.provider in self.manager.outages():
            return declared  # its runtime is down: asking it would only wait out its retries
        try:
            said = await self.manager.provider(spec.provider).serves(spec)
        except ModelMoraError:
            return declared
        if said is None or declared is None:
            return declared if said is None else said
        return said & declared

    async def capabilities(self, spec: ModelSpec) -> list[str]:
        """``chat``, ``completions``, ``embeddings``: what ``/v1/models`` says a model serves."""
        routes = await self.routes(spec)
        return [what for what, route in OPENAI_ENDPOINTS.items() if routes is None or route in routes]

    async def _check_route(self, name: str, path: str) -> None:
        """Refuse, before any lease (a lease may evict others), a route the model cannot serve."""
        spec = self.manager.spec(name)
        routes = await self.routes(spec)
        if routes is None or path in routes:
            return
        if not routes:
            message = f"model {name!r} runs on the {spec.provider!r} provider, a simulated runtime that answers no requests"  # fmt: skip
        else:
            message = f"model {name!r} serves {', '.join(f'/v1/{r}' for r in sorted(routes))} only"
        self.metrics.count_request(name, 400)
        raise api_error(400, message, "unsupported_endpoint")

    def state_of(self, request: InFlight) -> str:
        """``queued``, ``loading`` (the load it waits for runs) or ``forwarded``."""
        if request.phase == "forwarded":
            return "forwarded"
        return "loading" if self._load_under_way(request.model) else "queued"

    def progress(self, request: InFlight) -> str:
        """The SSE comment line a waiting streaming client gets now."""
        return progress_line(
            request.model, self.requests.position(request), self.loads.estimate(request.model)
        )

    async def handle(self, request: Request, path: str, body: _Body) -> Response:
        name = body.model
        note: RequestNote | None = request.scope.get(NOTE)
        if note is not None:
            note.model = name
        registered(self.manager, name)
        priority, key = self._who(request, name)
        keep_alive = self._keep_alive(body, request.headers.get("x-keep-alive"))
        lease_id = request.headers.get("x-modelmora-lease")
        if lease_id is not None and self.leases is not None:
            self.leases.check(lease_id, name)  # 404 / 409 in one line
        await self._check_route(name, path)
        size = len(await request.body())
        ready = self.manager.is_loaded(name) and not self.manager.is_parked(name)
        inflight = self.requests.add(
            name, stream=body.stream, key=key.name if key is not None else None, lease=lease_id
        )
        keepalive = not body.stream and request.headers.get("x-modelmora-keepalive", "").strip() == "1"
        if (body.stream or keepalive) and not ready:
            # the queue's limits answer before any byte of the stream
            self._check_queue(name, size)
            return _WaitingStream(
                self, inflight, path, body, request, keep_alive, size, note,
                priority=priority, key=key, keepalive=keepalive,
            )  # fmt: skip
        try:
            got = await unless(
                lambda: self._lease(name, keep_alive, size, note, priority, key),
                disconnected(request.receive),
                inflight.cancelled.wait,
            )
        except ModelMoraError as exc:
            self.requests.done(inflight)
            self.metrics.count_request(name, http_status(self.manager, exc))
            raise
        except BaseException:
            self.requests.done(inflight)
            raise
        if got is None:  # the client left, or the request was cancelled: never forwarded
            self.requests.done(inflight)
            self.metrics.count_request(name, CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)
        lease, handle = got[0]
        return await self.serve(inflight, lease, handle, path, body, request)

    async def serve(
        self, inflight: InFlight, lease: Lease, handle: Handle, path: str, body: _Body, request: Request
    ) -> Response:
        """The answer to a request that holds its lease; the lease and the request's record
        end with the answer."""
        self.requests.forwarded(inflight)

        def done() -> None:
            lease.release()
            self.requests.done(inflight)

        try:
            if handle.endpoint is None:
                response: Response = await self._in_process(handle, path, body)
                done()
                return response
            return await self._forward(inflight, done, handle, path, body, request)
        except BaseException:
            done()
            raise

    def _upstream(self, handle: Handle, path: str, body: _Body) -> tuple[str, dict[str, Any]]:
        """The runtime's URL for ``path`` and the body it gets: the model renamed to what the
        runtime calls it, modelmora's own fields dropped."""
        assert handle.endpoint is not None
        base = handle.endpoint.rstrip("/")
        url = f"{base}/{path}" if base.endswith("/v1") else f"{base}/v1/{path}"
        payload = body.model_dump(exclude_unset=True, exclude={"keep_alive"})
        payload["model"] = handle.model_name
        return url, payload

    async def _forward(
        self,
        inflight: InFlight,
        done: Callable[[], None],
        handle: Handle,
        path: str,
        body: _Body,
        request: Request,
    ) -> Response:
        url, payload = self._upstream(handle, path, body)
        # the bytes pass through untouched, so the runtime may compress only as the client can
        # decode; an answer whose model is renamed is asked for uncompressed
        rename = handle.model_name != body.model
        accept = "identity" if rename else request.headers.get("accept-encoding", "identity")
        try:
            reply = await self.client.post(url, json=payload, headers={"accept-encoding": accept})
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(handle, body.model, exc) from None
        try:
            self.metrics.count_request(body.model, reply.status)
            headers = {k: v for k, v in reply.headers.items() if k.lower() in _ENTITY_HEADERS}
        except BaseException:
            reply.release()
            raise

        def close() -> None:
            reply.release()  # an answer not read to its end: the runtime's connection is cut
            done()

        async def released_at_end() -> AsyncIterator[bytes]:
            # the lease ends before the last byte goes out: at once when the runtime's answer
            # is complete with this chunk, else before the end of the body is sent
            async for chunk in reply.content.iter_any():
                if reply.content.at_eof():
                    done()
                yield chunk
            done()

        content: AsyncIterator[bytes] = released_at_end()
        encoding = next((v for k, v in headers.items() if k.lower() == "content-encoding"), "identity")
        if rename and encoding.lower() == "identity":
            kind = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
            content = renamed(content, body.model, stream=_is_stream(kind))
        return _LeasedStream(content, close, inflight.cancelled, status_code=reply.status, headers=headers)

    def _unreachable(self, handle: Handle, name: str, exc: BaseException) -> APIError:
        self.metrics.count_request(name, 502)
        why = str(exc) or type(exc).__name__
        return api_error(502, f"{handle.provider} did not answer for {name!r}: {why}", "upstream_unreachable")

    async def hot(
        self, path: str, raw: bytes, keep_alive_header: str | None, accept_encoding: str
    ) -> HotAnswer | None:
        """The answer to a non-streaming request for a registered model that is ready; None
        when the request needs the full path (anything invalid, a model not ready or parked,
        a route it may not serve, streaming, an in-process model), which then answers it from
        the start.  The same lease, keep-alive, metrics and pass-through as the full path;
        only the framework layers are skipped.  The caller sends the answer and must close
        it (that releases the runtime's connection and the lease)."""
        try:
            body = ROUTES[path].model_validate_json(raw)
            keep_alive = self._keep_alive(body, keep_alive_header)
        except (ValidationError, APIError):
            return None
        name, mm = body.model, self.manager
        if body.stream or name not in mm.config.models or not mm.is_loaded(name) or mm.is_parked(name):
            return None
        spec = mm.spec(name)
        try:
            routes = await self.routes(spec)
            if routes is not None and path not in routes:
                return None
            lease = mm.use(name, keep_alive=keep_alive)
        except ModelMoraError:
            return None
        handle = lease.enter_now()  # never waits, never starts a load: those are the full path's
        if handle is None:
            return None
        if handle.endpoint is None:
            lease.release()
            return None
        url, payload = self._upstream(handle, path, body)
        rename = handle.model_name != name  # only then: the answer passes through as it is
        try:
            reply = await self.upstream.post(
                url,
                _json(payload),
                [(b"Accept-Encoding", b"identity" if rename else accept_encoding.encode("latin-1"))],
            )
        except UpstreamError as exc:
            lease.release()
            error = self._unreachable(handle, name, exc)
            content = _json(error_body(error))
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
            ]
            return HotAnswer(name, error.status, headers, _once(content), _nothing)
        except BaseException:
            lease.release()
            raise
        if reply is None:  # not a plain-HTTP runtime: the full path calls it with aiohttp
            lease.release()
            return None
        self.metrics.count_request(name, reply.status)
        answer = reply.body
        if rename and _plain(reply.headers):
            # the length changes with the name: the answer goes out chunked
            headers = [(k, v) for k, v in reply.headers if k in _RENAMED_HEADERS_B]
            kind = next((v for k, v in reply.headers if k == b"content-type"), b"")
            answer = renamed(answer, name, stream=_is_stream(kind))
        else:
            headers = [(k, v) for k, v in reply.headers if k in _PASSED_HEADERS_B]

        def close() -> None:
            reply.release()
            lease.release()

        return HotAnswer(name, reply.status, headers, answer, close)

    async def _in_process(self, handle: Handle, path: str, body: _Body) -> Response:
        if path != "embeddings" or not isinstance(body, EmbeddingRequest):
            raise api_error(400, f"model {body.model!r} runs in-process; it serves /v1/embeddings only", "unsupported_endpoint")  # fmt: skip
        raw: list[Any] = [body.input] if isinstance(body.input, str) else list(body.input)
        texts = [t for t in raw if isinstance(t, str)]
        if len(texts) != len(raw) or not texts:
            raise api_error(
                400, "in-process embedding models take text input, not token ids", "invalid_input"
            )
        if getattr(handle, "isolated", False):
            vectors = await handle.call("encode", texts)  # type: ignore[attr-defined]
        else:
            model = handle.obj
            if not hasattr(model, "encode"):
                raise api_error(400, f"model {body.model!r} has no encode(): not an embedding model", "unsupported_endpoint")  # fmt: skip
            vectors = await anyio.to_thread.run_sync(lambda: model.encode(texts))
        data = [
            {"object": "embedding", "index": i, "embedding": [float(x) for x in v]}
            for i, v in enumerate(vectors)
        ]
        self.metrics.count_request(body.model, 200)
        tokens = sum(len(t.split()) for t in texts)
        return JSONResponse(
            {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        )  # fmt: skip


# an object key "model" and its string value; a JSON string cannot hold an unescaped quote,
# so in a valid document this matches keys only, never text inside a value
_MODEL_FIELD = re.compile(rb'("model"\s*:\s*)"(?:[^"\\]|\\.)*"')
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_RENAMED_HEADERS_B = _PASSED_HEADERS_B - {b"content-length"}


def _plain(headers: list[tuple[bytes, bytes]]) -> bool:
    """The answer is not compressed (the runtime was asked for identity; one may not listen)."""
    return all(k != b"content-encoding" or v.strip().lower() == b"identity" for k, v in headers)


def _is_stream(content_type: str | bytes) -> bool:
    text = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
    return text.split(";", 1)[0].strip().lower() == "text/event-stream"


def rename_model(document: bytes, value: bytes) -> bytes:
    """``document`` (one JSON text, or one ``data: {...}`` line of a stream) with its
    top-level ``"model"`` set to ``value`` (a JSON string); nested ``"model"`` keys (a
    runtime echoing a request, say) are left alone.  The key is found by a literal scan; its
    depth by counting the brackets outside strings on the shorter side of it (before it:
    one open; after its value: one more close than opens), all in C, so a megabyte of
    embeddings is never tokenised in Python, whether the runtime writes ``model`` first
    (Ollama, vLLM) or after the data (llama.cpp sorts its keys)."""
    for match in _MODEL_FIELD.finditer(document):
        start, end = match.span()
        if start <= len(document) - end:
            side, want = _STRING.sub(b"", document[:start]), 1
        else:
            side, want = _STRING.sub(b"", document[end:]), -1
        if side.count(b"{") + side.count(b"[") - side.count(b"}") - side.count(b"]") == want:
            return document[:start] + match.group(1) + value + document[end:]
    return document


class ModelRenamer:
    """Sets the top-level ``"model"`` of a runtime's answer to the name the client asked for
    (``qwen2.5:14b`` → ``qwen``).  A stream (server-sent events) is renamed line by line as
    its bytes arrive, so an event goes out as soon as its line is complete; a JSON answer
    when it has all arrived (its length changes).  A scan over bytes, not a JSON decode and
    encode: an answer of megabytes (embeddings) costs a pass, not two."""

    __slots__ = ("_held", "_stream", "_value")

    def __init__(self, name: str, *, stream: bool):
        self._value = json.dumps(name).encode()
        self._stream = stream
        self._held: list[bytes] = []

    def _lines(self, data: bytes) -> bytes:
        if b'"model"' not in data:
            return data
        value = self._value
        return b"\n".join(
            rename_model(line, value) if b'"model"' in line else line for line in data.split(b"\n")
        )

    def feed(self, chunk: bytes) -> bytes:
        """What can go out now: a stream's complete lines (with what was held before them)."""
        cut = chunk.rfind(b"\n") + 1 if self._stream else 0
        if not cut:
            self._held.append(chunk)
            return b""
        if self._held:
            self._held.append(chunk[:cut])
            lines = b"".join(self._held)
            self._held = []
        else:
            lines = chunk[:cut]
        if cut < len(chunk):
            self._held.append(chunk[cut:])
        return self._lines(lines)

    def end(self) -> bytes:
        """The rest: a JSON answer whole, or a stream's last line without a newline."""
        rest, self._held = b"".join(self._held), []
        if not rest:
            return b""
        return self._lines(rest) if self._stream else rename_model(rest, self._value)


async def renamed(chunks: AsyncIterator[bytes], name: str, *, stream: bool) -> AsyncIterator[bytes]:
    """``chunks`` with the top-level ``"model"`` naming ``name`` (see :class:`ModelRenamer`)."""
    renamer = ModelRenamer(name, stream=stream)
    async for chunk in chunks:
        out = renamer.feed(chunk)
        if out:
            yield out
    tail = renamer.end()
    if tail:
        yield tail


@dataclasses.dataclass
class HotAnswer:
    """A hot-path answer for ``model``: its status, headers and body (passed through as the
    runtime sends it, compressed or not, never buffered whole); ``close`` releases the
    runtime's connection and the lease, however the answer ended."""

    model: str
    status: int
    headers: list[tuple[bytes, bytes]]
    body: AsyncIterator[bytes]
    close: Callable[[], None]


async def _once(content: bytes) -> AsyncIterator[bytes]:
    yield content


def _nothing() -> None:
    return None


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class _LeasedStream(StreamingResponse):
    """Streams the runtime's bytes untouched; closes upstream and releases the lease however
    the response ends (finished, client gone before the first byte, or mid-stream — Starlette
    cancels the stream when the client disconnects — or cancelled through ``/requests``)."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], None],
        cancelled: anyio.Event,
        **kwargs: Any,
    ):
        super().__init__(content, **kwargs)
        self._on_close = on_close
        self._cancelled = cancelled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await unless(
                lambda: super(_LeasedStream, self).__call__(scope, receive, send), self._cancelled.wait
            )
        finally:
            self._on_close()  # no await: nothing can cancel it

    async def body_only(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The answer's body after a :class:`_WaitingStream` has sent the status line: the
        runtime's status is dropped (a stream that opened has said 200)."""

        async def without_start(message: Message) -> None:
            if message["type"] != "http.response.start":
                await send(message)

        await self(scope, receive, without_start)


class _WaitingStream(Response):
    """A streaming request whose model is not ready.  Until the request has waited
    ``progress_after`` seconds it is answered like any other (an error with its status);
    then the stream opens (200, ``text/event-stream``) and gets an SSE comment line every
    ``progress_every`` seconds (position in the queue, load progress and ETA: see
    :mod:`modelmora.server.progress`) until its model is ready, then the runtime's stream;
    an error after the stream opened is one ``data: {"error": …}`` event, which OpenAI's
    clients raise as an API error.  A client that leaves, or a cancel through
    ``/requests``, ends the wait with nothing taken and nothing forwarded.

    ``keepalive``: a non-streaming request that asked for it (``X-Modelmora-Keepalive:
    1``) gets the same wait with ``application/json`` and one space every
    ``progress_every`` seconds instead of comment lines, then the runtime's JSON: leading
    whitespace is insignificant in JSON (RFC 8259, section 2), so every parser reads the
    answer unchanged, while the bytes keep idle connections and intermediate proxies from
    timing out.  Its price, and why it is opt-in: the status is then committed to 200, so a
    failure after that arrives as an OpenAI error object in a 200 body."""

    def __init__(
        self,
        proxy: Proxy,
        inflight: InFlight,
        path: str,
        body: _Body,
        request: Request,
        keep_alive: float | None,
        size: int,
        note: RequestNote | None,
        *,
        priority: int | None = None,
        key: ApiKey | None = None,
        keepalive: bool = False,
    ):
        super().__init__(status_code=200)
        self.proxy, self.inflight, self.path, self.payload = proxy, inflight, path, body
        self.request, self.keep_alive, self.size, self.note = request, keep_alive, size, note
        self.priority, self.key, self.keepalive = priority, key, keepalive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        proxy, inflight = self.proxy, self.inflight
        got: list[tuple[Lease, Handle]] = []
        failed: list[BaseException] = []
        ready = anyio.Event()
        opened = False

        async def wait() -> None:
            try:
                got.append(
                    await proxy._lease(
                        self.payload.model, self.keep_alive, self.size, self.note, self.priority, self.key
                    )
                )
            except Exception as exc:  # answered below, as the stream stands
                failed.append(exc)
            finally:
                ready.set()

        async def tell() -> None:
            nonlocal opened
            with anyio.move_on_after(proxy.progress_after):
                await ready.wait()
            while not ready.is_set():
                if not opened:
                    kind = b"application/json" if self.keepalive else b"text/event-stream; charset=utf-8"
                    headers = [(b"content-type", kind), (b"cache-control", b"no-cache")]
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    opened = True
                line = b" " if self.keepalive else proxy.progress(inflight).encode()
                await send({"type": "http.response.body", "body": line, "more_body": True})
                with anyio.move_on_after(proxy.progress_every):
                    await ready.wait()

        async def both() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(tell)
                await wait()

        try:
            finished = await unless(both, disconnected(receive), inflight.cancelled.wait)
        except BaseException:
            proxy.requests.done(inflight)
            raise
        if finished is None or not (got or failed):  # the client left, or was cancelled
            proxy.requests.done(inflight)
            proxy.metrics.count_request(self.payload.model, CLIENT_GONE)
            return
        if failed:
            proxy.requests.done(inflight)
            exc = failed[0]
            if isinstance(exc, ModelMoraError):
                proxy.metrics.count_request(self.payload.model, http_status(proxy.manager, exc))
            if not opened:
                raise exc  # the app's error handlers answer it
            error = _error_json(proxy, exc) if self.keepalive else _error_event(proxy, exc)
            await send({"type": "http.response.body", "body": error, "more_body": False})
            return
        lease, handle = got[0]
        response = await proxy.serve(inflight, lease, handle, self.path, self.payload, self.request)
        if not opened:
            await response(scope, receive, send)
        elif isinstance(response, _LeasedStream):
            await response.body_only(scope, receive, send)
        else:  # an in-process answer (embeddings): it does not stream
            answer = bytes(response.body)
            await send(
                {
                    "type": "http.response.body",
                    "body": answer if self.keepalive else b"data: " + answer + b"\n\n",
                    "more_body": False,
                }
            )


def _error_event(proxy: Proxy, exc: BaseException) -> bytes:
    """One ``data:`` event in OpenAI's error shape, ending the stream."""
    return b"data: " + _error_json(proxy, exc) + b"\n\n"


def _error_json(proxy: Proxy, exc: BaseException) -> bytes:
    """``exc`` in OpenAI's error shape, as JSON."""
    if isinstance(exc, APIError):
        body: dict[str, object] = error_body(exc)
    elif isinstance(exc, ModelMoraError):
        body = openai_error(http_status(proxy.manager, exc), str(exc), type(exc).__name__)
    else:
        body = openai_error(
            500, f"internal error: {type(exc).__name__}: {exc}".splitlines()[0][:500], "internal_error"
        )
    return _json(body)


def router(proxy: Proxy) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["OpenAI-compatible proxy"])

    async def model_object(name: str, capabilities: list[str], now: int) -> dict[str, Any]:
        spec = proxy.manager.config.models[name]
        return {
            "id": name, "object": "model", "created": now, "owned_by": spec.provider,
            "capabilities": capabilities,
        }  # fmt: skip

    async def capabilities_of(names: list[str]) -> dict[str, list[str]]:
        """What each model serves; a runtime that cannot say within ``SERVES_TIMEOUT``
        (asked once per model; cached) limits nothing, as on the request path."""
        models = proxy.manager.config.models
        found = {name: list(OPENAI_ENDPOINTS) for name in names}

        async def ask(name: str) -> None:
            found[name] = await proxy.capabilities(models[name])

        with anyio.move_on_after(SERVES_TIMEOUT):
            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(ask, name)
        return found

    @api.get("/models")
    async def list_models() -> dict[str, Any]:
        """The registry's models, each with what it serves (``capabilities``: ``chat``,
        ``completions``, ``embeddings``; empty for a simulated runtime)."""
        now = int(time.time())
        names = sorted(proxy.manager.config.models)
        serves = await capabilities_of(names)
        return {"object": "list", "data": [await model_object(n, serves[n], now) for n in names]}

    # {model:path}: registry names may contain "/" (team/llm)
    @api.get("/models/{model:path}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        """One model (the ``openai`` SDK's ``models.retrieve``); 404 for a name the registry
        does not have, with a did-you-mean."""
        registered(proxy.manager, model)
        serves = await capabilities_of([model])
        return await model_object(model, serves[model], int(time.time()))

    @api.post("/chat/completions")
    async def chat(request: Request, body: ChatRequest) -> Response:
        return await proxy.handle(request, "chat/completions", body)

    @api.post("/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await proxy.handle(request, "completions", body)

    @api.post("/embeddings")
    async def embeddings(request: Request, body: EmbeddingRequest) -> Response:
        return await proxy.handle(request, "embeddings", body)

    return api


__all__ = ["NOTE", "ModelRenamer", "Proxy", "RequestNote", "rename_model", "renamed", "router"]
