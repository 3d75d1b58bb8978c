"""The hot path's keep-alive pool to the runtimes (``modelmora.server.upstream``), against
a real TCP server on loopback that answers with scripted bytes: framing (length, chunked,
ended by a close), reuse only of connections whose answer was read to the end, runtimes
that close, stall or never listen, and back-pressure on a large answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from modelmora.server.upstream import _HIGH_WATER, UpstreamError, UpstreamPool

pytestmark = pytest.mark.anyio

Script = Callable[[bytes, asyncio.StreamWriter], Any]


class Runtime:
    """A TCP server that reads each request (head + Content-Length body) and hands it to
    ``script``, which writes whatever answer bytes the test wants; counts connections."""

    def __init__(self, script: Script):
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if await self.script(request, writer) == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/completions"


async def runtime(script: Script) -> AsyncIterator[Runtime]:
    rt = Runtime(script)
    rt.server = await asyncio.start_server(rt._serve, "127.0.0.1", 0)
    try:
        yield rt
    finally:
        rt.server.close()


def answer(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body


async def echo(request: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(answer(request.split(b"\r\n\r\n", 1)[1]))


async def read(pool: UpstreamPool, url: str, body: bytes = b'{"a":1}') -> tuple[int, bytes]:
    reply = await pool.post(url, body, [(b"Accept-Encoding", b"identity")])
    assert reply is not None
    try:
        return reply.status, b"".join([chunk async for chunk in reply.body])
    finally:
        reply.release()


async def test_answers_read_to_the_end_reuse_one_connection() -> None:
    async for rt in runtime(echo):
        pool = UpstreamPool(timeout=5)
        for i in range(5):
            assert await read(pool, rt.url, b'{"n":%d}' % i) == (200, b'{"n":%d}' % i)
        assert rt.connections == 1
        head = rt.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
        assert head[0] == b"POST /v1/completions HTTP/1.1" and b"Accept-Encoding: identity" in head
        pool.close()


async def test_an_answer_left_unread_never_reaches_the_next_request() -> None:
    async for rt in runtime(echo):
        pool = UpstreamPool(timeout=5)
        reply = await pool.post(rt.url, b'{"first":1}', [])
        assert reply is not None
        reply.release()  # its body was never read
        assert await read(pool, rt.url, b'{"second":2}') == (200, b'{"second":2}')
        assert rt.connections == 2
        pool.close()


async def test_chunked_answers_are_dechunked_and_close_delimited_ones_end_at_the_close() -> None:
    async def chunked(request: bytes, writer: asyncio.StreamWriter) -> str | None:
        if b'"says-close"' in request:  # says so, but leaves closing to the client
            writer.write(answer(b"bye", b"Connection: close"))
            return None
        if b'"close"' in request:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil the end"
            )
            await writer.drain()
            return "close"
        writer.write(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        return None

    async for rt in runtime(chunked):
        pool = UpstreamPool(timeout=5)
        assert await read(pool, rt.url) == (201, b"hello world")
        assert await read(pool, rt.url, b'"close"') == (200, b"until the end")
        assert await read(pool, rt.url) == (201, b"hello world")
        assert await read(pool, rt.url, b'"says-close"') == (200, b"bye")
        assert await read(pool, rt.url) == (201, b"hello world")
        assert rt.connections == 3  # neither connection the runtime ended was reused
        pool.close()


async def test_a_runtime_that_closes_mid_answer_or_stalls_is_an_upstream_error() -> None:
    async def faulty(request: bytes, writer: asyncio.StreamWriter) -> str | None:
        if b'"cut"' in request:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
            await writer.drain()
            return "close"
        if b'"silent"' in request:
            return None  # never answers
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nslow...")  # 13 bytes short, forever
        return None

    async for rt in runtime(faulty):
        pool = UpstreamPool(timeout=0.5)
        with pytest.raises(UpstreamError, match="before its answer ended"):
            await read(pool, rt.url, b'"cut"')
        with pytest.raises(UpstreamError, match="no byte from the runtime"):
            await read(pool, rt.url, b'"silent"')
        with pytest.raises(UpstreamError, match="no byte from the runtime"):
            await read(pool, rt.url, b'"stall"')
        assert not any(pool._idle.values())  # none of them went back to the pool
        pool.close()


async def test_garbage_from_the_runtime_and_a_closed_port_are_upstream_errors() -> None:
    async def garbage(request: bytes, writer: asyncio.StreamWriter) -> str:
        writer.write(b"SPDY/9 what\r\n\r\n")
        await writer.drain()
        return "close"

    async for rt in runtime(garbage):
        pool = UpstreamPool(timeout=5)
        with pytest.raises(UpstreamError, match="could not be parsed"):
            await read(pool, rt.url)
        url = rt.url
    with pytest.raises(UpstreamError, match="could not connect"):
        await read(pool, url)  # the server is gone


async def test_urls_and_headers_it_does_not_send_are_declined() -> None:
    pool = UpstreamPool(timeout=5)
    assert await pool.post("https://127.0.0.1:1/v1/completions", b"{}", []) is None
    assert await pool.post("http://user:pw@127.0.0.1:1/v1/completions", b"{}", []) is None
    assert await pool.post("http://127.0.0.1:1/v1/modèle", b"{}", []) is None  # aiohttp encodes IRIs
    assert (
        await pool.post("http://127.0.0.1:1/v1/x", b"{}", [(b"Accept-Encoding", b"gzip\r\nX-Evil: 1")])
        is None
    )


async def test_answers_released_after_the_pool_closed_close_their_connection() -> None:
    async for rt in runtime(echo):
        pool = UpstreamPool(timeout=5)
        reply = await pool.post(rt.url, b"{}", [])
        assert reply is not None
        assert b"".join([chunk async for chunk in reply.body]) == b"{}"
        pool.close()
        reply.release()
        assert not any(pool._idle.values()) and reply._conn.transport is not None
        assert reply._conn.transport.is_closing()


async def test_a_cancelled_request_closes_its_connection() -> None:
    started = asyncio.Event()

    async def hang(request: bytes, writer: asyncio.StreamWriter) -> None:
        started.set()

    async for rt in runtime(hang):
        pool = UpstreamPool(timeout=30)
        task = asyncio.ensure_future(read(pool, rt.url))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not any(pool._idle.values())
        pool.close()


async def test_a_large_answer_pauses_reading_instead_of_buffering_it_all() -> None:
    size = 8 * _HIGH_WATER

    async def large(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(b"x" * size))
        await writer.drain()

    async for rt in runtime(large):
        pool = UpstreamPool(timeout=5)
        reply = await pool.post(rt.url, b"{}", [])
        assert reply is not None
        conn = reply._conn
        total, peak = 0, 0
        async for chunk in reply.body:
            # what was held when this chunk was taken (measured after the sleep below, the
            # first chunk, already taken, was counted on top of the buffer refilled behind it)
            peak = max(peak, conn.buffered + len(chunk))
            if not total:
                await asyncio.sleep(0.3)  # a slow client: the runtime has time to send it all
            total += len(chunk)
        reply.release()
        assert total == size and peak <= _HIGH_WATER + 256 * 1024  # at most one read past the mark
        assert await read(pool, rt.url) == (200, b"x" * size)  # and the connection was reusable
        assert rt.connections == 1
        pool.close()


async def test_an_interim_1xx_answer_is_skipped_and_never_shifts_answers_onto_later_requests() -> None:
    async def early(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(answer(request.split(b"\r\n\r\n", 1)[1]))

    async for rt in runtime(early):
        pool = UpstreamPool(timeout=5)
        assert await read(pool, rt.url, b'{"n":1}') == (200, b'{"n":1}')
        assert await read(pool, rt.url, b'{"n":2}') == (200, b'{"n":2}')
        pool.close()


async def test_bytes_the_runtime_sends_past_its_answer_never_reach_the_next_request() -> None:
    async def stray(request: bytes, writer: asyncio.StreamWriter) -> None:
        body = request.split(b"\r\n\r\n", 1)[1]
        if b'"same-write"' in request:  # a second answer in the same segment as the first
            writer.write(answer(body) + answer(b"STRAY"))
            return
        writer.write(answer(body))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(answer(b"STRAY"))  # arrives while the connection is idle in the pool

    async for rt in runtime(stray):
        pool = UpstreamPool(timeout=5)
        assert await read(pool, rt.url, b'{"n":1}') == (200, b'{"n":1}')
        await asyncio.sleep(0.2)
        assert await read(pool, rt.url, b'{"n":2}') == (200, b'{"n":2}')
        await asyncio.sleep(0.2)  # its stray answer has come too (after a request: taken as the answer)
        assert await read(pool, rt.url, b'{"same-write":3}') == (200, b'{"same-write":3}')
        await asyncio.sleep(0.2)
        assert await read(pool, rt.url, b'{"n":4}') == (200, b'{"n":4}')
        pool.close()
