"""Run an ASGI app under uvicorn in a background thread, on a free loopback port: for
tests, emulators, and anyone embedding modelmora's server in a test suite."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

import anyio

from ..net import free_port


def quiet_server(config: Any) -> Any:
    """A uvicorn server that lets closed connections finish closing before its loop ends,
    so stopping it between tests leaks no sockets."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            await anyio.sleep(0.05)

    return QuietServer(config)


class ThreadedServer:
    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        lifespan: Literal["auto", "on", "off"] = "on",
        options: Mapping[str, Any] | None = None,
    ):
        """``options``: more ``uvicorn.Config`` arguments, e.g. ``modelmora.server.server_options()``
        to run the app as ``modelmora serve`` does."""
        self.app = app
        self.options = dict(options or {})
        self.host = host
        self.port = port or free_port(host)
        self.lifespan = lifespan
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _wait_port_free(self, timeout: float) -> None:
        """A restart on the same port must wait until the old listener is really gone."""
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.host, self.port))
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"port {self.port} is still in use") from None
            time.sleep(0.05)

    def start(self, timeout: float = 30.0) -> ThreadedServer:
        import uvicorn

        self._wait_port_free(timeout)
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan=self.lifespan,
            timeout_graceful_shutdown=2,  # a request stuck in the app must not keep the port forever
            **self.options,
        )
        self._server = quiet_server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["ThreadedServer", "free_port", "quiet_server"]
