"""The floor under any Python proxy: a byte relay on uvloop that forwards each client
connection to one upstream connection and back, parsing nothing (so it cannot route,
lease or check anything — no proxy can be this cheap).

    python benchmarks/tcp_relay.py UPSTREAM_PORT PORT

``bench_llamacpp_router.py`` runs it beside ``bare_proxy.py`` and ``modelmora serve``.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

UPSTREAM_PORT = int(sys.argv[1])


class _Back(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport):
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Front(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client: asyncio.Transport = transport  # type: ignore[assignment]
        self.upstream: asyncio.BaseTransport | None = None
        self.pending: list[bytes] = []
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.upstream, _ = await loop.create_connection(lambda: _Back(self.client), "127.0.0.1", UPSTREAM_PORT)
        for data in self.pending:
            self.upstream.write(data)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def main() -> None:
    server = await asyncio.get_running_loop().create_server(_Front, "127.0.0.1", int(sys.argv[2]))
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
