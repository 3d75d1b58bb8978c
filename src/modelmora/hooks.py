"""Lifecycle hooks: commands or Python callables run around a model's load and unload.

When they run (the manager calls :meth:`HookRunner.before` and :meth:`HookRunner.after`):

* ``before_load`` once admission has reserved the model's memory (evictions done) and
  before the runtime is asked to load it; ``before_unload`` before the runtime is asked to
  unload it (an idle unload, an eviction, a manual one).  Both are **awaited**: a
  ``before_load`` that stops another GPU program, or a ``before_unload`` that drains a
  queue, has finished when the runtime is called.
* ``after_load`` and ``after_unload`` start once the runtime has answered and run in the
  background: a caller waiting for the model is served without waiting for them.

Parks and wakes (the warm tier) and models that vanish behind the manager's back run no
hooks.  The global hooks (``ManagerConfig.hooks``) run first, then the model's own
(``ModelSpec.hooks``), then Python callables given to the manager, one at a time.

Every hook is bounded by ``hook_timeout`` (seconds).  A command runs in a session of its
own with ``MODELMORA_MODEL``, ``MODELMORA_EVENT`` (the hook's name), ``MODELMORA_DEVICE``
and ``MODELMORA_PROVIDER`` added to the environment; when it ends, or runs past its time,
its whole process group is killed, so nothing it started is left behind.  A synchronous
callable runs in a worker thread (past its time it is abandoned: a thread cannot be
killed); an asynchronous one is cancelled.  A failure — an exception, a non-zero exit, a
timeout — is logged as a warning and sent as :class:`~modelmora.events.HookFailed`; it
never fails the load or unload it was about.  Success is a :class:`~modelmora.events.HookRan`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import anyio
import anyio.abc

from . import events as ev
from .spec import HOOK_EVENTS, ModelSpec, format_duration

log = logging.getLogger("modelmora")

OUTPUT_LIMIT = 2000
"""Characters of a failed command's output kept in its error (the end of it)."""


@dataclass(frozen=True, slots=True)
class HookContext:
    """What a Python hook is told: ``event`` (``"before_load"``, ...), the model's name,
    the device it loads on or left, its provider and its spec."""

    event: str
    model: str
    device: str
    provider: str
    spec: ModelSpec


HookCallable: TypeAlias = Callable[[HookContext], Awaitable[None] | None]
"""A Python hook: ``def hook(ctx)`` or ``async def hook(ctx)``."""

Hook: TypeAlias = str | list[str] | HookCallable


class HookError(Exception):
    """One hook's failure, as the HookFailed event says it."""


def check_hooks(
    hooks: Mapping[str, HookCallable | Sequence[HookCallable]] | None,
) -> dict[str, list[HookCallable]]:
    """Python hooks by event, checked: an unknown event name is a ValueError."""
    out: dict[str, list[HookCallable]] = {}
    for event, value in (hooks or {}).items():
        if event not in HOOK_EVENTS:
            raise ValueError(f"unknown hook {event!r} (use one of {', '.join(HOOK_EVENTS)})")
        fns = list(value) if isinstance(value, Sequence) else [value]
        for fn in fns:
            if not callable(fn):
                raise ValueError(f"the {event} hook {fn!r} is not callable")
        out[event] = list(fns)
    return out


def describe_hook(hook: Hook) -> str:
    if isinstance(hook, str):
        return hook
    if isinstance(hook, list):
        return shlex.join(hook)
    return getattr(hook, "__qualname__", repr(hook))


def hook_environment(ctx: HookContext) -> dict[str, str]:
    return {
        **os.environ,
        "MODELMORA_MODEL": ctx.model,
        "MODELMORA_EVENT": ctx.event,
        "MODELMORA_DEVICE": ctx.device,
        "MODELMORA_PROVIDER": ctx.provider,
    }


async def run_command(command: str | list[str], env: Mapping[str, str], timeout: float) -> None:
    """Run ``command`` (a string through the shell, or argv) to its end, at most
    ``timeout`` seconds; then kill its process group, whatever it left running.

    Raises :class:`HookError` for a non-zero exit (with the end of its output), a
    timeout, or a command that cannot start; cancellation kills it as well."""
    try:
        process = await anyio.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,  # its own process group: killed whole
        )
    except OSError as exc:
        raise HookError(f"cannot start: {exc}") from None
    output = bytearray()

    async def drain() -> None:
        assert process.stdout is not None
        async for chunk in process.stdout:
            output.extend(chunk)
            del output[: max(0, len(output) - 4 * OUTPUT_LIMIT)]

    timed_out = False
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            with anyio.move_on_after(timeout) as scope:
                await process.wait()
            timed_out = scope.cancelled_caught
            _kill_group(process)  # what it started and left running ends with it
    finally:
        with anyio.CancelScope(shield=True):
            _kill_group(process)
            await process.wait()
            await process.aclose()
    if timed_out:
        raise HookError(f"took longer than the hook_timeout of {format_duration(timeout)} (killed)")
    if process.returncode:
        tail = output.decode(errors="replace").strip()[-OUTPUT_LIMIT:]
        raise HookError(f"exit status {process.returncode}" + (f": {tail}" if tail else ""))


def _kill_group(process: anyio.abc.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone already
        os.killpg(process.pid, signal.SIGKILL)


async def run_callable(fn: HookCallable, ctx: HookContext, timeout: float) -> None:
    """Call ``fn(ctx)``: awaited if it is a coroutine function, else in a worker thread
    (abandoned, not stopped, past its time).  Raises HookError on timeout or error."""
    with anyio.move_on_after(timeout) as scope:
        try:
            if inspect.iscoroutinefunction(fn):
                await fn(ctx)
            else:
                result = await anyio.to_thread.run_sync(fn, ctx, abandon_on_cancel=True)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            raise HookError(f"{type(exc).__name__}: {exc}") from exc
    if scope.cancelled_caught:
        raise HookError(f"took longer than the hook_timeout of {format_duration(timeout)}")


class HookRunner:
    """Runs the hooks configured for a model and event (see the module docstring).

    ``global_hooks``: the config's; ``callables``: Python hooks by event;
    ``spawn(fn, name)``: starts an ``after_*`` hook in the background, or raises once
    the manager is shutting down (the hook then runs in place, bounded as ever)."""

    def __init__(
        self,
        *,
        global_hooks: Any,
        timeout: float,
        bus: ev.EventBus,
        callables: Mapping[str, Sequence[HookCallable]] | None = None,
        spawn: Callable[[Callable[[], Awaitable[None]], str], None] | None = None,
    ):
        self.global_hooks = global_hooks
        self.timeout = timeout
        self.bus = bus
        self.callables = {k: list(v) for k, v in (callables or {}).items()}
        self.spawn = spawn

    def hooks(self, event: str, spec: ModelSpec) -> list[Hook]:
        found: list[Hook] = []
        for source in (self.global_hooks, spec.hooks):
            command = source.command(event) if source is not None else None
            if command is not None:
                found.append(command)
        found.extend(self.callables.get(event, ()))
        return found

    async def before(self, event: str, spec: ModelSpec) -> None:
        """Run ``event``'s hooks for ``spec`` now, one after another (never raises but
        for cancellation)."""
        for hook in self.hooks(event, spec):
            await self._run(hook, self._context(event, spec))

    async def after(self, event: str, spec: ModelSpec) -> None:
        """Start ``event``'s hooks for ``spec`` in the background; during shutdown, when
        nothing new starts in the background, run them here (bounded as ever)."""
        hooks = self.hooks(event, spec)
        if not hooks:
            return
        ctx = self._context(event, spec)

        async def run() -> None:
            for hook in hooks:
                await self._run(hook, ctx)

        if self.spawn is not None:
            try:
                self.spawn(run, f"modelmora-{event}-{spec.name}")
                return
            except Exception:  # ManagerClosed: shutting down
                pass
        with anyio.CancelScope(shield=True):
            await run()

    @staticmethod
    def _context(event: str, spec: ModelSpec) -> HookContext:
        return HookContext(
            event=event, model=spec.name, device=spec.device, provider=spec.provider, spec=spec
        )

    async def _run(self, hook: Hook, ctx: HookContext) -> None:
        started = time.monotonic()
        what = describe_hook(hook)
        try:
            if isinstance(hook, str | list):
                await run_command(hook, hook_environment(ctx), self.timeout)
            else:
                await run_callable(hook, ctx, self.timeout)
        except Exception as exc:  # HookError, or a bug of ours: never the load's failure
            self.bus.emit(
                ev.HookFailed(
                    model=ctx.model,
                    hook=ctx.event,
                    command=what,
                    error=str(exc),
                    duration_s=time.monotonic() - started,
                )
            )
            return
        self.bus.emit(
            ev.HookRan(model=ctx.model, hook=ctx.event, command=what, duration_s=time.monotonic() - started)
        )


__all__ = [
    "Hook",
    "HookCallable",
    "HookContext",
    "HookError",
    "HookRunner",
    "check_hooks",
    "run_callable",
    "run_command",
]
