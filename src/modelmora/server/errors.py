"""Errors as HTTP answers: OpenAI's error shape, one readable message, the right status."""

from __future__ import annotations

import math

from fastapi import Request
from fastapi.responses import JSONResponse

from ..core import ModelManager
from ..errors import (
    ConfigError,
    InsufficientMemory,
    ModelInUse,
    ModelMoraError,
    ModelMoraTimeout,
    ModelNotFound,
    ProviderUnavailable,
    RecentlyFailed,
    UnknownModel,
)


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


def api_error(status: int, message: str, code: str, *, retry_after: int | None = None) -> APIError:
    return APIError(status, message, code, retry_after)


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
        case ConfigError():
            return 400
        case RecentlyFailed() | InsufficientMemory():
            return 503
        case ModelMoraTimeout():
            return 504
        case ProviderUnavailable():
            return 502
        case _:
            return 502 if exc.provider else 500


def _body(status: int, message: str, code: str) -> dict[str, object]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": code}}


def error_body(exc: APIError) -> dict[str, object]:
    """OpenAI's error shape for ``exc``."""
    return _body(exc.status, exc.message, exc.code)


async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(_body(exc.status, exc.message, exc.code), status_code=exc.status, headers=headers)


def waiting_cannot_help(manager: ModelManager, exc: InsufficientMemory) -> bool:
    """A refusal no retry can turn around: nothing else holds the memory (the model is bigger
    than the budget) or only pinned models do, until someone unpins or force-unloads."""
    if exc.would_evict:  # an eviction failed: the runtime may do better next time
        return False
    pinned = {e.name for e in manager.entries() if e.pinned}
    return set(exc.holders) <= pinned


def http_status(manager: ModelManager, exc: ModelMoraError) -> int:
    """:func:`status_for`, and 409 for a memory refusal that retrying cannot help."""
    if isinstance(exc, InsufficientMemory) and waiting_cannot_help(manager, exc):
        return 409
    return status_for(exc)


async def handle_modelmora_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelMoraError)
    status = http_status(request.app.state.manager, exc)
    headers = None
    if isinstance(exc, RecentlyFailed):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    elif status == 503:
        headers = {"Retry-After": "5"}  # until something else lets go, which nothing predicts
    return JSONResponse(_body(status, str(exc), type(exc).__name__), status_code=status, headers=headers)


async def handle_internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything else is a bug; it is still answered in the API's shape, in one line."""
    message = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0][:500]
    return JSONResponse(_body(500, message, "internal_error"), status_code=500)


__all__ = [
    "APIError",
    "api_error",
    "error_body",
    "handle_api_error",
    "handle_internal_error",
    "handle_modelmora_error",
    "http_status",
    "registered",
    "resident_or_registered",
    "status_for",
    "waiting_cannot_help",
]
