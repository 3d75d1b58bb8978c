"""Errors as HTTP answers: OpenAI's error shape, one readable message, the right status."""

from __future__ import annotations

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


async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(_body(exc.status, exc.message, exc.code), status_code=exc.status, headers=headers)


async def handle_modelmora_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelMoraError)
    status = status_for(exc)
    headers = None
    if isinstance(exc, RecentlyFailed | InsufficientMemory):
        headers = {"Retry-After": "5"}
    return JSONResponse(_body(status, str(exc), type(exc).__name__), status_code=status, headers=headers)


__all__ = ["APIError", "api_error", "handle_api_error", "handle_modelmora_error", "registered", "status_for"]
