"""What stands between the network and the manager, as plain ASGI middleware that runs before
FastAPI reads a body:

* **Host allow-list** (:class:`HostCheck`, see :func:`allowed_hosts`): a
  server without a token answers only to loopback host names, so a DNS-rebinding page
  (``attacker.example`` resolved to 127.0.0.1) gets 400.
* **Token** (:class:`Guard`): with one set, every route but ``/health`` needs
  ``Authorization: Bearer …`` (scheme in any case; compared as UTF-8 bytes in constant
  time); the status page and its event stream, which a browser opens by URL, also take
  ``?token=``.  Unauthenticated ``/health`` says only that the server is up.  API keys
  (``api_keys`` in the config, :class:`ApiKey`) are further bearer tokens, each with its
  own priority, weight and model allow-list; the one a request carried is in the scope
  under :data:`API_KEY`.
* **Cross-origin writes** (:class:`Guard`): state-changing requests (any method but
  GET/HEAD/OPTIONS) that carry a foreign ``Origin`` (or ``Sec-Fetch-Site: cross-site``)
  get 403, and bodies must be JSON (415), so an HTML form or a "simple" ``fetch`` from
  another site can neither send one nor skip the CORS preflight.  Same-origin requests
  and clients that send no ``Origin`` (curl, SDKs) pass; ``allow_origins`` opts web apps
  in (with CORS headers, ``CORSMiddleware``).
* **Bodies** (:class:`Guard`): read in full before the app sees them, within
  ``max_body`` bytes (413, chunked or not) and ``read_timeout`` seconds (408).  Slow
  *headers* are bounded in the HTTP protocol itself (:mod:`.serving`).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import unquote_to_bytes

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ManagerConfig
from ..errors import ConfigError
from ..spec import format_duration

OPEN_PATHS = frozenset({"/health"})
QUERY_TOKEN_PATHS = frozenset({"/", "/events"})  # the status page and its EventSource
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
AUTHORISED = "modelmora.authorised"  # scope key: the request carried the token (or none is set)
API_KEY = "modelmora.api_key"  # scope key: the ApiKey the request carried, if any


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """One API key: its name, its secret (UTF-8 bytes), the priority and fair-share weight
    of its requests, and the models it may use (None: all)."""

    name: str
    token: bytes
    priority: int = 0
    weight: float = 1.0
    models: frozenset[str] | None = None


def api_keys(config: ManagerConfig, environ: Mapping[str, str]) -> list[ApiKey]:
    """The configured API keys with their secrets from ``environ``; ConfigError (one line)
    for a key whose variable is unset or empty."""
    out = []
    for name, key in config.api_keys.items():
        secret = environ.get(key.token_env, "")
        if not secret:
            raise ConfigError(f"api_keys.{name}: the environment variable {key.token_env} is unset or empty")
        models = frozenset(key.models) if key.models is not None else None
        out.append(ApiKey(name, secret.encode("utf-8"), key.priority, key.weight, models))
    return out


def allowed_hosts(token: str | None, extra: Iterable[str] = ()) -> list[str]:
    """Host names the server answers to: any with a token (a rebinding page cannot know
    it), else loopback names plus ``extra`` (the bind address, ``--allow-host``)."""
    if token is not None:
        return ["*"]
    hosts = [*LOOPBACK_HOSTS]
    for host in extra:
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        if host not in hosts and host not in ("0.0.0.0", "[::]"):
            hosts.append(host)
    return hosts


async def _reply(
    send: Send, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A refusal in OpenAI's error shape, as every error of the server is."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    body = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})


class HostCheck:
    """Answers only to ``allowed`` host names (``*`` any; ``*.example.com`` its subdomains),
    like starlette's ``TrustedHostMiddleware`` but refusing in the API's error shape."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]):
        self.app = app
        self.any = "*" in allowed
        self.exact = frozenset(h.lower() for h in allowed if not h.startswith("*"))
        self.suffixes = tuple(h[1:].lower() for h in allowed if h.startswith("*."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = _host_name((header(scope, b"host") or b"").decode("latin-1"))
        if host in self.exact or (self.suffixes and host.endswith(self.suffixes)):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        shown = host[:100] or "(none)"
        await _reply(
            send,
            400,
            f"invalid Host header {shown!r}: without a token the server answers to loopback names "
            "only; start it with --allow-host or a token",
            "invalid_host",
        )


def _host_name(value: str) -> str:
    """The host of a ``Host`` header, without the port (``[::1]:8765`` → ``[::1]``)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    return value.partition(":")[0]


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case bytes), as starlette reads it."""
    for key, value in scope.get("headers") or []:
        if key == name:
            return bytes(value)
    return None


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class Guard:
    """The token, cross-origin, content-type and body checks (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        max_body: int,
        read_timeout: float = 30.0,
        allow_origins: Sequence[str] = (),
        keys: Sequence[ApiKey] = (),
    ):
        self.app = app
        self.token = token.encode("utf-8") if token is not None else None
        self.keys = tuple(keys)
        self.max_body = max_body
        self.read_timeout = read_timeout
        self.allow_origins = frozenset(o.rstrip("/").encode("latin-1") for o in allow_origins)

    def _authorised(self, scope: Scope) -> bool:
        if self.token is None and not self.keys:
            return True
        scheme, _, given = (header(scope, b"authorization") or b"").strip().partition(b" ")
        if scheme.lower() == b"bearer":
            given = given.strip()
            # every key compared, in constant time each: which one matched leaks no timing
            matched = [k for k in self.keys if hmac.compare_digest(given, k.token)]
            if matched:
                scope[API_KEY] = matched[0]
                return True
            if self.token is not None and hmac.compare_digest(given, self.token):
                return True
        if self.token is None:
            return False
        if scope["method"] == "GET" and scope["path"] in QUERY_TOKEN_PATHS:
            for part in bytes(scope.get("query_string", b"")).split(b"&"):
                key, _, value = part.partition(b"=")
                if key == b"token" and hmac.compare_digest(
                    unquote_to_bytes(value.replace(b"+", b" ")), self.token
                ):
                    return True
        return False

    def _cross_origin(self, scope: Scope) -> str | None:
        """Why a state-changing request from a web page of another site is refused, or None."""
        if scope["method"] in SAFE_METHODS:
            return None
        origin = header(scope, b"origin")
        if origin is not None:
            origin = origin.rstrip(b"/")
            host = header(scope, b"host") or b""
            if origin in self.allow_origins or origin in (b"http://" + host, b"https://" + host):
                return None
            shown = origin.decode("latin-1")[:100]
            return f"cross-origin request from {shown!r} refused; start the server with --allow-origin {shown} to allow it"
        if (header(scope, b"sec-fetch-site") or b"").lower() in (b"cross-site", b"same-site"):
            return "cross-origin request refused (Sec-Fetch-Site); start the server with --allow-origin to allow a web app"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorised = self._authorised(scope)
        scope[AUTHORISED] = authorised
        if not authorised and scope["path"] not in OPEN_PATHS:
            await _reply(
                send,
                401,
                "missing or wrong bearer token",
                "invalid_api_key",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        refused = self._cross_origin(scope)
        if refused is not None:
            await _reply(send, 403, refused, "cross_origin_refused")
            return
        length = header(scope, b"content-length")
        has_body = header(scope, b"transfer-encoding") is not None or (
            length is not None and length.strip() not in (b"", b"0")
        )
        if not has_body:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in SAFE_METHODS and not _is_json(header(scope, b"content-type") or b""):
            await _reply(
                send,
                415,
                "request bodies must be JSON (Content-Type: application/json)",
                "unsupported_media_type",
            )
            return
        if length is not None and length.strip().isdigit() and int(length) > self.max_body:
            await self._too_large(send)
            return
        try:
            body = await self._read_body(receive)
        except _TooLarge:
            await self._too_large(send)
            return
        except TimeoutError:
            await _reply(send, 408, f"request body not received within {format_duration(self.read_timeout)}", "request_timeout", [(b"connection", b"close")])  # fmt: skip
            return
        if body is None:
            return  # the client went away while sending it
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later: http.disconnect, which streaming answers watch for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        """413, announced by its length or found while reading; the connection closes."""
        await _reply(
            send,
            413,
            f"request body over {self.max_body} bytes",
            "request_too_large",
            [(b"connection", b"close")],
        )

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, within the size and time limits; None when the client hangs up."""
        chunks: list[bytes] = []
        seen = 0
        with anyio.fail_after(self.read_timeout):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return None
                chunk = bytes(message.get("body", b""))
                seen += len(chunk)
                if seen > self.max_body:
                    raise _TooLarge
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)


class _TooLarge(Exception):
    pass


def is_loopback(host: str) -> bool:
    return host in {"127.0.0.1", "::1", "localhost"} or host.startswith("127.")


__all__ = [
    "API_KEY",
    "AUTHORISED",
    "LOOPBACK_HOSTS",
    "ApiKey",
    "Guard",
    "HostCheck",
    "allowed_hosts",
    "api_keys",
    "header",
    "is_loopback",
]
