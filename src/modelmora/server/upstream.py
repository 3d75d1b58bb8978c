"""Keep-alive HTTP/1.1 connections to the runtimes, for the proxy's hot path.

A request for a resident model is one round trip to a runtime on loopback, and the client
that makes it is most of what the proxy adds to it.  aiohttp (which every other proxied
request still uses) spends ~0.4 ms of CPU per request here, against ~0.15 ms for the same
exchange written in one piece and parsed by httptools — the C parser (llhttp) that uvicorn
already runs on — and the issue's bound for the whole proxy is 1 ms
(``benchmarks/bench_llamacpp_router.py`` measures both).  So the hot path sends its one
plain request shape through this pool; every other case (TLS, an endpoint it cannot
parse) is declined with None and goes to aiohttp on the full path.

What it does, and only that: ``POST`` with a ``Content-Length`` body on a pooled
connection per ``host:port``; the answer's head is awaited, its body handed out as it
arrives (never buffered beyond ``_HIGH_WATER`` bytes: reading pauses), and the connection
goes back to the pool only when its answer was read to the end and the runtime keeps it
alive (RFC 9112 §9.3).  A connection is never reused while an answer on it is unread, so a
runtime's bytes can never reach the wrong request.  Every wait is bounded by ``timeout``
seconds between bytes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import urllib.parse
from collections.abc import AsyncIterator

import httptools

from ..spec import format_duration

_HIGH_WATER = 256 * 1024  # bytes of an answer held before reading from the runtime pauses
_IDLE_PER_HOST = 16  # idle connections kept per runtime; more are closed when released


class UpstreamError(Exception):
    """The runtime could not be reached, or closed or stalled before its answer ended."""


class _Connection(asyncio.Protocol):
    """One TCP connection to a runtime and the state of the answer being read on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.error: UpstreamError | None = None
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.framed = False  # Content-Length or chunked: the end is known without a close
        self.interim = False  # the message being parsed is a 1xx, skipped (RFC 9110 §15.2)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.idle_in: list[_Connection] | None = None  # the pool's idle list holding it, if any

    def next_answer(self) -> None:
        """Ready the state for the next request on this (kept-alive) connection."""
        self.head_done = self.complete = self.keep_alive = self.framed = False
        self.status, self.headers = 0, []

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is not a subclass)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = self.error or UpstreamError(f"the runtime's answer could not be parsed: {exc}")
            assert self.transport is not None
            self.transport.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.idle_in is not None:  # closed while idle (the runtime stopped, or timed it out)
            self.idle_in.remove(self)
            self.idle_in = None
        self._wake()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a message after the answer, before the next request: untrustworthy
            self.error = UpstreamError("the runtime sent more than one answer to a request")
            raise self.error  # the parser stops; data_received closes the connection

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # interim: the answer follows on this connection
            self.interim = True
            self.headers, self.framed = [], False
            return
        self.status = status
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.keep_alive = self.parser.should_keep_alive()  # only valid inside the callback
        self.complete = True

    # -- waiting ---------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until the runtime sends something or closes; UpstreamError after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter, timeout)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered <= _HIGH_WATER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and not self.lost
            and self.error is None
            and not self.chunks
            and self.keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamError(f"no byte from the runtime in {format_duration(timeout)}"))


class UpstreamReply:
    """A runtime's answer: ``status``, ``headers`` (lower-case names, as sent) and ``body``,
    an async iterator of the body's bytes as they arrive (de-chunked).  ``release()`` must be
    called however the answer ended; it returns the connection to the pool only when the
    answer was read to its end."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], conn: _Connection, timeout: float):
        self._pool, self._key, self._conn, self._timeout = pool, key, conn, timeout
        self.status = conn.status
        self.headers = conn.headers
        self._released = False

    async def _body(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                return
            elif conn.error is not None:
                raise conn.error
            elif conn.lost:
                if conn.framed:
                    raise UpstreamError("the runtime closed the connection before its answer ended")
                return  # an answer delimited by the close (RFC 9112 §6.3, item 8)
            else:
                await conn.wait(self._timeout)

    @property
    def body(self) -> AsyncIterator[bytes]:
        return self._body()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._conn.reusable:
            self._pool._put(self._key, self._conn)
        else:
            self._conn.close()


@functools.lru_cache(maxsize=256)
def _target(url: str) -> tuple[str, int, bytes, bytes] | None:
    """(host, port, request target, Host header) of a plain-HTTP URL; None for anything else."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.username or parts.password:
        return None
    try:
        port = parts.port or 80
    except ValueError:
        return None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        return parts.hostname, port, target.encode("ascii"), parts.netloc.encode("ascii")
    except UnicodeEncodeError:  # an IRI: aiohttp on the full path encodes it
        return None


class UpstreamPool:
    """Keep-alive connections per runtime (``host:port``).  ``timeout`` (seconds) bounds the
    connect and every wait for the runtime's next byte; exceeding it is an UpstreamError."""

    def __init__(self, timeout: float, connect_timeout: float = 10.0):
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._closed = False  # after close(): answers released later close their connection

    async def post(self, url: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> UpstreamReply | None:
        """POST ``body`` (JSON) to ``url`` with ``headers``; the answer's head has arrived when
        this returns.  None when the URL or a header is not one this pool sends (the caller
        uses its general client); UpstreamError when the runtime cannot be reached or does not
        answer in time.  On cancellation the connection is closed, never pooled."""
        target = _target(url)
        if target is None or any(b"\r" in v or b"\n" in v for _, v in headers):
            return None
        host, port, path, host_header = target
        head = [
            b"POST ",
            path,
            b" HTTP/1.1\r\nHost: ",
            host_header,
            b"\r\nContent-Type: application/json\r\n",
        ]
        for name, value in headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n", body]
        key = (host, port)
        conn = await self._get(key)
        try:
            assert conn.transport is not None
            conn.transport.write(b"".join(head))
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                if conn.lost:
                    raise UpstreamError("the runtime closed the connection without answering")
                await conn.wait(self.timeout)
        except BaseException:
            conn.close()
            raise
        return UpstreamReply(self, key, conn, self.timeout)

    async def _get(self, key: tuple[str, int]) -> _Connection:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            conn.idle_in = None
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                conn.next_answer()
                return conn
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, key[0], key[1]), self.connect_timeout
            )
        except TimeoutError:
            raise UpstreamError(
                f"could not connect to {key[0]}:{key[1]} in {format_duration(self.connect_timeout)}"
            ) from None
        except OSError as exc:
            raise UpstreamError(f"could not connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from None
        return conn

    def _put(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if self._closed or len(idle) >= _IDLE_PER_HOST:
            conn.close()
        else:
            idle.append(conn)
            conn.idle_in = idle

    def close(self) -> None:
        """Close every idle connection (answers in flight close theirs when released)."""
        self._closed = True
        for idle in self._idle.values():
            for conn in list(idle):
                conn.idle_in = None
                conn.close()
        self._idle.clear()


__all__ = ["UpstreamError", "UpstreamPool", "UpstreamReply"]
