"""How uvicorn runs modelmora's app: h11 with a deadline on each request's headers.

uvicorn bounds the idle time between requests (keep-alive) but not the time a client may
take to send its headers, so a client dripping one byte a second holds a connection for as
long as it likes.  :class:`BoundedH11Protocol` closes a connection whose request headers
are not complete within ``read_timeout`` seconds of the connection opening (or of the last
response); the body's own deadline is :class:`~modelmora.server.security.Guard`'s.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class BoundedH11Protocol(H11Protocol):
    header_timeout: float = 30.0
    _header_timer: asyncio.TimerHandle | None = None

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

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def server_options(*, read_timeout: float = 30.0) -> dict[str, Any]:
    """``uvicorn.Config``/``uvicorn.run`` keyword arguments for modelmora's app."""
    protocol = type("BoundedH11Protocol", (BoundedH11Protocol,), {"header_timeout": read_timeout})
    return {"http": protocol}


__all__ = ["BoundedH11Protocol", "server_options"]
