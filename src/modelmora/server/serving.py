"""How uvicorn runs modelmora's app: httptools and uvloop, with a deadline on each
request's headers.

uvicorn bounds the idle time between requests (keep-alive) but not the time a client may
take to send its headers, so a client dripping one byte a second holds a connection for as
long as it likes.  The protocols here close a connection whose request headers are not
complete within ``read_timeout`` seconds of the connection opening (or of the last
response); the body's own deadline is :class:`~modelmora.server.security.Guard`'s.

httptools (llhttp, in C) parses requests and uvloop runs the event loop where they are
installed (the ``server`` extra installs both on Linux and macOS): on the proxy's hot path
they take about 0.3 ms off each request against h11 and asyncio's own loop
(``benchmarks/bench_llamacpp_router.py``, the proxy-overhead table).  h11 is the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeaderDeadline:
    """Mixin for a uvicorn HTTP protocol: arm on connect and after each response, disarm
    when a request's headers are in."""

    header_timeout: float = 30.0
    _header_timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _idle(self) -> bool:
        raise NotImplementedError

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._idle() and not self.transport.is_closing():
            self.transport.close()


class BoundedH11Protocol(_HeaderDeadline, H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        idle = self.cycle is None or self.cycle.response_complete
        return idle and self.conn.their_state is h11.IDLE


def _httptools_protocol() -> type[Any] | None:
    if importlib.util.find_spec("httptools") is None:
        return None
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
        _headers_pending = False  # a request has begun and its headers are not all in

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            self._headers_pending = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._headers_pending = False
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _idle(self) -> bool:
            # waiting for a request's headers: either some have begun and are not all in,
            # or nothing runs and nothing parsed waits its turn (a pipelined request whose
            # headers are in is running or queued, and is never cut)
            if self._headers_pending:
                return True
            running = self.cycle is not None and not self.cycle.response_complete
            return not running and not self.pipeline

    return BoundedHttpToolsProtocol


def uvloop_available() -> bool:
    """Whether ``anyio.run(..., backend_options={"use_uvloop": True})`` can use uvloop."""
    return importlib.util.find_spec("uvloop") is not None


def server_options(*, read_timeout: float = 30.0) -> dict[str, Any]:
    """``uvicorn.Config``/``uvicorn.run`` keyword arguments for modelmora's app."""
    base = _httptools_protocol() or BoundedH11Protocol
    protocol = type(base.__name__, (base,), {"header_timeout": read_timeout})
    return {"http": protocol}


class Server(uvicorn.Server):
    """uvicorn's server for ``modelmora serve``: the command handles the signals (a first
    one sets ``should_exit``, a second cancels everything at once), and a stop first runs
    ``on_stop`` (which ends the ``/events`` streams), so uvicorn's graceful shutdown is not
    held up by the status page until the browser goes away."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None] = lambda: None):
        super().__init__(config)
        self.on_stop = on_stop

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's would replace the command's handlers and re-raise the signal afterwards
        # (SIGTERM's default kills the process before the manager has shut down)
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_stop()
        await super().shutdown(sockets=sockets)


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to, as uvicorn would open them,
    made before the server starts so that a busy port is an :class:`OSError` before anything
    claims to serve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    made: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, _, _, _, address in infos:
            if (family, address[:2]) not in seen:
                seen.add((family, address[:2]))
                made.append(socket.create_server(address, family=family))
    except OSError:
        for sock in made:
            sock.close()
        raise
    return made


class _QuietCancel(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" for a request cancelled because the
    server is stopping (a second Ctrl-C, or past the graceful timeout): not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def log_config(level: int) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of ``modelmora serve``: modelmora's lines (each
    proxied request on ``modelmora.requests``, each lifecycle event) at ``level`` and above on
    stderr; uvicorn's own at WARNING and above (all of them, its access log too, at DEBUG)."""
    uvicorn_level = level if level <= logging.DEBUG else max(level, logging.WARNING)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "line": {"format": "%(asctime)s %(levelname)-7s %(message)s", "datefmt": "%H:%M:%S"},
        },
        "filters": {"quiet_cancel": {"()": _QuietCancel}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "line",
                "stream": "ext://sys.stderr",
                "filters": ["quiet_cancel"],
            },
        },
        "loggers": {
            "modelmora": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": uvicorn_level, "propagate": False},
            "uvicorn.error": {"level": uvicorn_level},
            "uvicorn.access": {"level": uvicorn_level},
        },
    }


__all__ = ["BoundedH11Protocol", "Server", "bind", "log_config", "server_options", "uvloop_available"]
