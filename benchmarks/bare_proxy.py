"""The bare baseline for the proxy's added latency: a Python proxy as one usually writes it —
one raw ASGI function under uvicorn (httptools, uvloop) forwarding each request to one
upstream with aiohttp — and nothing else: no validation, no leases, no security checks.

    python benchmarks/bare_proxy.py UPSTREAM_URL PORT

``bench_llamacpp_router.py`` runs it beside ``modelmora serve`` against the same
``llama-server``, so the table shows what modelmora adds against the plain way of proxying
(modelmora's hot path calls the runtime through its own keep-alive pool instead of aiohttp,
see ``modelmora.server.upstream``).
"""

from __future__ import annotations

import sys
from typing import Any

import aiohttp
import uvicorn

UPSTREAM = sys.argv[1].rstrip("/")
session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global session
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if session is None:
        session = aiohttp.ClientSession(auto_decompress=False)
    headers = {"content-type": "application/json"}
    async with session.request(
        scope["method"], UPSTREAM + scope["path"], data=body, headers=headers
    ) as reply:
        content = await reply.read()
        status = reply.status
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": content})


if __name__ == "__main__":
    uvicorn.run(
        app, host="127.0.0.1", port=int(sys.argv[2]), http="httptools", loop="uvloop", log_level="warning"
    )
