"""Errors as HTTP answers: OpenAI's error shape, one readable message, the right status."""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core import ModelManager
from ..errors import (
    ConfigError,
    HeldByLeases,
    InsufficientMemory,
    ModelInUse,
    ModelMoraError,
    ModelMoraTimeout,
    ModelNotFound,
    Overloaded,
    ProviderOutage,
    ProviderUnavailable,
    RecentlyFailed,
    UnknownModel,
)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None,
        retry_after: int | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.param = param


def api_error(
    status: int, message: str, code: str | None, *, retry_after: int | None = None, param: str | None = None
) -> APIError:
    return APIError(status, message, code, retry_after, param)


def registered(manager: ModelManager, name: str) -> str:
    """``name`` if the registry has it; else a 404 with a did-you-mean or the known names.
    Inline ``provider/target`` names never reach a runtime through the server."""
    if name not in manager.config.models:
        raise api_error(404, str(UnknownModel(name, manager.config.models)), "model_not_found")
    return name


def resident_or_registered(manager: ModelManager, name: str) -> str:
    """Like :func:`registered`, but also a resident model the registry lacks (one adopted
    from the runtime, ``ollama/qwen2.5:14b``), so it can be unloaded."""
    if any(entry.name == name for entry in manager.entries()):
        return name
    return registered(manager, name)


def status_for(exc: ModelMoraError) -> int:
    match exc:
        case UnknownModel() | ModelNotFound():
            return 404
        case ModelInUse():
            return 409
        case Overloaded():
            return 429
        case ConfigError():
            return 400
        case RecentlyFailed() | InsufficientMemory() | ProviderOutage():
            return 503
        case ModelMoraTimeout():
            return 504
        case ProviderUnavailable():
            return 502
        case _:
            return 502 if exc.provider else 500


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape: every error the server answers has it (the schema says so
    instead of FastAPI's ``{"detail": [...]}`` for 422)."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "Invalid request (OpenAI's error shape)"},
}


def openai_error(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, object]:
    """OpenAI's error shape, the one every error of the server has: ``{"error": {"message",
    "type", "param", "code"}}``, ``code`` a string or null (the ``openai`` SDK reads them
    into its exceptions' ``.code`` and ``.param``)."""
    # OpenAI's types: 429 is a rate_limit_error (its SDK raises RateLimitError on the status)
    kind = (
        "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_body(exc: APIError) -> dict[str, object]:
    """OpenAI's error shape for ``exc``."""
    return openai_error(exc.status, exc.message, exc.code, exc.param)


async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def handle_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a method the route lacks) in the same shape
    (FastAPI answers ``{"detail": "Not Found"}``)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (204, 304) or exc.status_code < 400:
        return Response(status_code=exc.status_code, headers=exc.headers)
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        message = f"{request.method} is not allowed on {request.url.path}" + (
            f" (allowed: {allowed})" if allowed else ""
        )
    else:
        message = str(exc.detail)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return JSONResponse(
        openai_error(exc.status_code, message, code), status_code=exc.status_code, headers=exc.headers
    )


_FRIENDLY = {"extra_forbidden": "unknown field", "missing": "required field missing"}


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A body, path or query parameter FastAPI refused (422), in the same shape: the first
    problem in one line, ``param`` naming the field and ``code`` pydantic's error type
    (``missing``, ``json_invalid``, ...)."""
    assert isinstance(exc, RequestValidationError)
    errors: list[dict[str, Any]] = [dict(e) for e in exc.errors()]
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid_request"}
    loc = [str(p) for p in first.get("loc", ()) if not isinstance(p, int)]
    param = ".".join(loc[1:]) if len(loc) > 1 and loc[0] in ("body", "query", "path", "header") else None
    kind = str(first.get("type") or "invalid_request")
    if kind == "json_invalid":
        ctx = first.get("ctx")
        why = ctx.get("error") if isinstance(ctx, dict) else None
        message = "the body is not valid JSON" + (f": {why}" if why else "")
    else:
        text = _FRIENDLY.get(kind) or str(first.get("msg") or "invalid value")
        message = f"{param}: {text}" if param else text
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return JSONResponse(openai_error(422, message, kind, param), status_code=422)


def waiting_cannot_help(manager: ModelManager, exc: InsufficientMemory) -> bool:
    """A refusal no retry can turn around: nothing else holds the memory (the model is bigger
    than the budget) or only pinned models do, until someone unpins or force-unloads."""
    if exc.would_evict:  # an eviction failed: the runtime may do better next time
        return False
    pinned = {e.name for e in manager.entries() if e.pinned}
    return set(exc.holders) <= pinned


def http_status(manager: ModelManager, exc: ModelMoraError) -> int:
    """:func:`status_for`, and 409 for a memory refusal that retrying cannot help."""
    if isinstance(exc, HeldByLeases) or (
        isinstance(exc, InsufficientMemory) and waiting_cannot_help(manager, exc)
    ):
        return 409
    return status_for(exc)


async def handle_modelmora_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelMoraError)
    status = http_status(request.app.state.manager, exc)
    headers = None
    if isinstance(exc, Overloaded):
        # back-pressure: when to come back, and how busy the model is, in the error too
        body = openai_error(status, str(exc), type(exc).__name__)
        detail = body["error"]
        assert isinstance(detail, dict)
        detail.update(in_flight=exc.in_flight, waiting=exc.waiting, retry_after=math.ceil(exc.retry_after))
        headers = {
            "Retry-After": str(max(1, math.ceil(exc.retry_after))),
            "X-Modelmora-In-Flight": str(exc.in_flight),
            "X-Modelmora-Waiting": str(exc.waiting),
        }
        return JSONResponse(body, status_code=status, headers=headers)
    if isinstance(exc, RecentlyFailed | ProviderOutage | HeldByLeases):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    elif status == 503:
        headers = {"Retry-After": "5"}  # until something else lets go, which nothing predicts
    return JSONResponse(
        openai_error(status, str(exc), type(exc).__name__), status_code=status, headers=headers
    )


async def handle_internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything else is a bug; it is still answered in the API's shape, in one line."""
    message = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0][:500]
    return JSONResponse(openai_error(500, message, "internal_error"), status_code=500)


__all__ = [
    "ERROR_RESPONSES",
    "APIError",
    "ErrorBody",
    "api_error",
    "error_body",
    "handle_api_error",
    "handle_http_error",
    "handle_internal_error",
    "handle_modelmora_error",
    "handle_validation_error",
    "http_status",
    "openai_error",
    "registered",
    "resident_or_registered",
    "status_for",
    "waiting_cannot_help",
]
