"""The server against hostile pages and clients, over real HTTP on a live uvicorn (loopback):
cross-origin and DNS-rebinding requests, tokens (non-ASCII, scheme case, ``?token=``
scope, ``/health``), slow clients, oversized chunked bodies and compressed upstream
answers."""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelmora import ModelManager
from modelmora.cli.remote import RemoteManager
from modelmora.memory import StaticProbe
from modelmora.providers.base import Handle, Observed, Provider
from modelmora.server import create_app, server_options
from modelmora.spec import ModelSpec
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def config_for(emu: OllamaEmulator) -> dict[str, Any]:
    return {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}},
        "models": {
            "qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"},
            "embed": {
                "provider": "ollama",
                "target": "nomic-embed-text",
                "memory": "300MB",
                "options": {"kind": "embedding"},
            },
        },
    }


@pytest.fixture
def serve() -> Iterator[Callable[..., ThreadedServer]]:
    """A live server as `modelmora serve` runs it (same uvicorn options)."""
    servers: list[ThreadedServer] = []

    def start(
        config: Any, *, host: str = "127.0.0.1", read_timeout: float = 30.0, **kwargs: Any
    ) -> ThreadedServer:
        app = create_app(config, read_timeout=read_timeout, **kwargs)
        server = ThreadedServer(app, host=host, options=server_options(read_timeout=read_timeout)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# -- 1. cross-origin requests and DNS rebinding, without a token ---------------------------


def test_a_web_page_cannot_change_state_on_the_loopback_server(
    serve: Callable[..., ThreadedServer], emu: OllamaEmulator
) -> None:
    server = serve(config_for(emu))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        # what a hostile page's fetch()/form sends: its Origin, a "simple" content type
        for path in ("/models/qwen/load", "/unload-all", "/models/qwen/unload", "/v1/chat/completions"):
            evil = c.post(path, headers={"Origin": "http://evil.example"})
            assert evil.status_code == 403, (path, evil.text)
            assert "cross-origin" in evil.json()["error"]["message"]
        null = c.post("/models/qwen/load", headers={"Origin": "null"})  # sandboxed iframe, file://
        assert null.status_code == 403
        site = c.post("/unload-all", headers={"Sec-Fetch-Site": "cross-site"})
        assert site.status_code == 403
        plain = c.post(
            "/v1/chat/completions",
            content=json.dumps({"model": "qwen", **CHAT}),
            headers={"Content-Type": "text/plain"},
        )
        assert plain.status_code == 415 and "application/json" in plain.json()["error"]["message"]
        form = c.post("/models/qwen/load", content=b"pin=true", headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert form.status_code == 415
        assert emu.stats.loads == 0 and c.get("/status").json()["models"] == []
        # the same origin (the status page's own), and clients that send no Origin, still work
        same = c.post("/models/qwen/load", headers={"Origin": server.url})
        assert same.status_code == 200, same.text
        assert c.post("/unload-all", json={"force": True}).json()["unloaded"] == ["qwen"]
        # reading is not state-changing: GETs from anywhere get the data but no CORS grant
        read = c.get("/status", headers={"Origin": "http://evil.example"})
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers


def test_dns_rebinding_is_refused_by_host(serve: Callable[..., ThreadedServer], emu: OllamaEmulator) -> None:
    server = serve(config_for(emu))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("/status", "/health", "/", "/models"):
            rebound = c.get(path, headers={"Host": f"attacker.example:{server.port}"})
            assert rebound.status_code == 400, (path, rebound.text)
        assert c.post("/unload-all", headers={"Host": "attacker.example"}).status_code == 400
        for host in ("localhost", "127.0.0.1", "[::1]"):
            assert c.get("/status", headers={"Host": f"{host}:{server.port}"}).status_code == 200


def test_allowed_origins_and_hosts_are_opt_in(
    serve: Callable[..., ThreadedServer], emu: OllamaEmulator
) -> None:
    server = serve(config_for(emu), allow_origins=["http://app.example"], allow_hosts=["box.lan"])
    with httpx.Client(base_url=server.url, timeout=30) as c:
        preflight = c.options(
            "/unload-all",
            headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"},
        )  # fmt: skip
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        ok = c.post("/unload-all", json={}, headers={"Origin": "http://app.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
        assert c.post("/unload-all", headers={"Origin": "http://other.example"}).status_code == 403
        assert c.get("/status", headers={"Host": "box.lan:8765"}).status_code == 200


def test_a_public_bind_with_a_token_serves_any_host_name(
    serve: Callable[..., ThreadedServer], emu: OllamaEmulator
) -> None:
    server = serve(config_for(emu), host="0.0.0.0", token="s3cret")
    url = server.url.replace("0.0.0.0", "127.0.0.1")
    auth = {"Authorization": "Bearer s3cret"}
    reply = httpx.get(f"{url}/status", headers={**auth, "Host": "gpu-box.lan:8765"})
    assert reply.status_code == 200
    evil = httpx.post(f"{url}/unload-all", headers={**auth, "Origin": "http://evil.example"})
    assert evil.status_code == 403


# -- 2. and 3. tokens ------------------------------------------------------------------------


def test_non_ascii_tokens_compare_as_bytes(serve: Callable[..., ThreadedServer], emu: OllamaEmulator) -> None:
    server = serve(config_for(emu), token="pässwort")
    with httpx.Client(base_url=server.url, timeout=30) as c:
        wrong = c.get("/status", headers={"Authorization": "Bearer café".encode()})
        assert wrong.status_code == 401
        latin = c.get("/status", headers={"Authorization": "Bearer pässwort".encode("latin-1")})
        assert latin.status_code == 401
        right = c.get("/status", headers={"Authorization": "Bearer pässwort".encode()})
        assert right.status_code == 200
        assert c.get("/?token=p%C3%A4sswort").status_code == 200
        assert c.get("/?token=caf%E9").status_code == 401
    with RemoteManager(server.url, token="pässwort") as remote:
        assert remote.loaded() == []


def test_token_scheme_health_and_query_scope(
    serve: Callable[..., ThreadedServer], emu: OllamaEmulator
) -> None:
    server = serve(config_for(emu), token="s3cret")
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/models/qwen/load", headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert c.get("/status", headers={"Authorization": "BEARER  s3cret"}).status_code == 200
        open_health = c.get("/health").json()
        assert open_health == {"status": "ok"}  # no model names without the token
        full = c.get("/health", headers={"Authorization": "Bearer s3cret"}).json()
        assert full["loaded"] == ["qwen"]
        # ?token= is for the status page, which a browser opens by URL (and its event stream)
        assert c.get("/?token=s3cret").status_code == 200
        with c.stream("GET", "/events?token=s3cret") as events:
            assert events.status_code == 200
        for method, path in (
            ("GET", "/status"),
            ("GET", "/metrics"),
            ("POST", "/unload-all"),
            ("GET", "/models"),
        ):
            assert c.request(method, f"{path}?token=s3cret").status_code == 401, path


# -- 4. slow clients -------------------------------------------------------------------------


def _closed_within(sock: socket.socket, drip: bytes, seconds: float) -> tuple[bool, bytes]:
    """Send ``drip`` one byte every 0.1 s; True when the server closes the connection first.

    Once the server has answered, stop sending and read until it closes: a byte sent after
    its close draws a TCP reset, which is still a close (not a test failure)."""
    received = b""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    for byte in drip:
        if not received:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return True, received
        try:
            chunk = sock.recv(4096)
            if not chunk:
                return True, received
            received += chunk
        except TimeoutError:
            pass
        except OSError:  # reset by the server: it closed the connection
            return True, received
        if time.monotonic() > deadline:
            return False, received
    return False, received


def test_headers_and_bodies_are_read_in_bounded_time(
    serve: Callable[..., ThreadedServer], emu: OllamaEmulator
) -> None:
    server = serve(config_for(emu), read_timeout=1.0)
    # the drips would take 26 s and 30 s; a close within 10 s (10 read timeouts) is a cut-off
    headers = f"POST /unload-all HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Padding: {'a' * 200}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        closed, _ = _closed_within(sock, headers.encode(), 10)
    assert closed, "slow headers were not cut off"
    request = (
        f"POST /unload-all HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 300\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request.encode())
        closed, answer = _closed_within(sock, b"{" + b" " * 298 + b"}", 10)
    assert closed, "a slow body was not cut off"
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    # a fresh connection that sends nothing at all is closed as well
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(10)
        assert sock.recv(100) == b""
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_the_header_deadline_never_cuts_a_pipelined_request_that_is_running(protocol: str) -> None:
    """Two requests in one write: the second runs for longer than the header deadline.  Its
    headers arrived long ago, so the connection must stay open until both are answered."""
    from modelmora.server import serving

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await anyio.sleep(float(scope["path"].strip("/")))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    options = serving.server_options(read_timeout=0.3)
    if protocol == "h11":
        options["http"] = type("Bounded", (serving.BoundedH11Protocol,), {"header_timeout": 0.3})
    assert protocol.lower() in options["http"].__mro__[1].__name__.lower()
    with (
        ThreadedServer(app, lifespan="off", options=options) as server,
        socket.create_connection(("127.0.0.1", server.port)) as sock,
    ):
        sock.sendall(b"GET /0.05 HTTP/1.1\r\nHost: x\r\n\r\nGET /1.0 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        received = b""
        while received.count(b"\r\n\r\nok") < 2:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    assert received.count(b"HTTP/1.1 200") == 2, received


# -- 5. oversized chunked bodies -------------------------------------------------------------


def test_an_oversized_chunked_body_is_413(serve: Callable[..., ThreadedServer], emu: OllamaEmulator) -> None:
    server = serve(config_for(emu), max_body=4096)
    payload = json.dumps({"model": "qwen", "messages": [{"role": "user", "content": "x" * 10_000}]}).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    reply = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert "content-length" not in reply.request.headers
    assert reply.status_code == 413, reply.text
    assert "4096 bytes" in reply.json()["error"]["message"]
    small = json.dumps({"model": "qwen", **CHAT}).encode()
    ok = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=iter([small[:10], small[10:]]),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert ok.status_code == 200, ok.text


# -- 6. compressed answers from the runtime --------------------------------------------------


class _Upstream(Provider):
    """A runtime at a fixed URL that answers every request gzip-compressed."""

    def __init__(self, url: str):
        super().__init__("upstream")
        self.url = url

    async def load(self, spec: ModelSpec) -> Handle:
        return Handle(spec=spec, provider=self.name, endpoint=self.url, api="openai", memory={"cpu": 1})

    async def unload(self, handle: Handle) -> dict[str, int]:
        handle.close()
        return {"cpu": 1}

    async def observe(self) -> list[Observed]:
        return []


def _gzip_app() -> Starlette:
    async def chat(request: Request) -> Response:
        body = await request.json()
        answer = {"object": "chat.completion", "model": body["model"],
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "zipped " * 50}}]}  # fmt: skip
        return Response(
            gzip.compress(json.dumps(answer).encode()),
            headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "Content-Language": "en",
            },
        )

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_compressed_upstream_answers_keep_their_encoding(serve: Callable[..., ThreadedServer]) -> None:
    with ThreadedServer(_gzip_app(), lifespan="off") as upstream:
        config = {"models": {"zip": {"provider": "upstream", "memory": {"cpu": 1}}}}
        mm = ModelManager(config, providers={"upstream": _Upstream(upstream.url)}, probe=StaticProbe({}))
        server = serve(mm)
        reply = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "zip", **CHAT}, timeout=30)
        assert reply.status_code == 200
        assert reply.headers["content-encoding"] == "gzip" and reply.headers["content-language"] == "en"
        assert reply.json()["choices"][0]["message"]["content"].startswith("zipped")
