"""Waiting for a server a provider started (a process, a container) to become ready."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx

from ..errors import LoadFailed


async def wait_until_ready(
    ready: Callable[[], Awaitable[bool]],
    died: Callable[[], Awaitable[str | None]],
    output: Callable[[], Awaitable[str]],
    *,
    model: str,
    provider: str,
    not_ready: str,
    timeout: float,
    interval: float,
    output_label: str = "last output",
    progress: Callable[[], bool] | None = None,
    progress_interval: float = 0.005,
) -> None:
    """Poll ``ready`` (HTTP errors mean "not yet": servers refuse connections while loading)
    until it holds: at once, then every ``interval`` seconds, and sooner whenever the cheap
    ``progress`` check (looked at every ``progress_interval`` seconds, e.g. "the server's
    log grew") says the server did something, so readiness is noticed when the server
    reports it rather than up to an interval later.  Fail at once when ``died`` says how
    the server ended, or at the deadline (``timeout`` seconds), quoting its last output
    either way."""
    deadline = time.monotonic() + timeout
    while True:
        ended = await died()
        if ended is not None:
            raise LoadFailed(
                f"{model}: {ended} before it was ready; {output_label}: {await output()}",
                model=model, provider=provider,
            )  # fmt: skip
        with contextlib.suppress(httpx.HTTPError):
            if await ready():
                return
        if time.monotonic() > deadline:
            raise LoadFailed(
                f"{model}: {not_ready} within {timeout:.0f}s; {output_label}: {await output()}",
                model=model, provider=provider,
            )  # fmt: skip
        await _pause(interval, progress, progress_interval)


async def _pause(interval: float, progress: Callable[[], bool] | None, step: float) -> None:
    """``interval`` seconds, or less once ``progress()`` holds (checked every ``step``)."""
    if progress is None or step >= interval:
        await anyio.sleep(interval)
        return
    until = time.monotonic() + interval
    while (left := until - time.monotonic()) > 0:
        await anyio.sleep(min(step, left))
        if progress():
            return


__all__ = ["wait_until_ready"]
