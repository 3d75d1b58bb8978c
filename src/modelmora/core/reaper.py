"""Background work: idle models go when their keep-alive ends, runtimes that expire models
on their own are refreshed, and reconciliation runs every ``reconcile_interval``.

A provider's error never ends this loop: it is reported as a ``Problem`` event and in
``status().problems`` (which the server's ``/health`` turns into "degraded"), and the
failing step backs off (doubling up to ``reconcile_interval``) while the rest carries on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from ..errors import UnloadFailed
from .context import Core
from .lifecycle import Entry, State
from .planner import can_park_within
from .reconcile import Reconciler
from .table import resident
from .transitions import Transitions

log = logging.getLogger("modelmora")


class Reaper:
    def __init__(self, core: Core, transitions: Transitions, reconciler: Reconciler):
        self.core = core
        self.transitions = transitions
        self.reconciler = reconciler
        self._not_before: dict[str, float] = {}  # component → when it may run again
        self._failures: dict[str, int] = {}

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        core = self.core
        next_reconcile = core.clock() + core.config.reconcile_interval
        while True:
            await anyio.sleep(core.config.reaper_interval)
            now = core.clock()
            await self._guarded("reaper", self.reap)
            if now >= next_reconcile:
                next_reconcile = now + core.config.reconcile_interval
                await self._guarded("reconcile", self.reconciler.run)
                await self._guarded("refresh", self.refresh)

    async def _guarded(self, component: str, step: Callable[[], Awaitable[None]]) -> None:
        now = self.core.clock()
        if now < self._not_before.get(component, 0.0):
            return
        try:
            await step()
        except Exception as exc:
            count = self._failures[component] = self._failures.get(component, 0) + 1
            delay = min(self.core.config.reaper_interval * 2.0**count, self.core.config.reconcile_interval)
            self._not_before[component] = now + delay
            self.core.problem(component, exc)
        else:
            if self._failures.pop(component, None):
                self.core.recovered(component)

    async def reap(self) -> None:
        now = self.core.clock()
        for entry in self.core.table:
            if entry.idle_expired(now, self.core.config.idle_ttl):
                await self.unload_idle(entry)

    def schedule_idle(self, entry: Entry) -> None:
        """A lease with keep-alive 0 ended: let the model go now, in the background."""
        if self.core.running and entry.owned and not entry.pinned:
            self.core.spawn(lambda: self.unload_idle(entry), name=f"modelmora-idle-{entry.name}")

    async def unload_idle(self, entry: Entry) -> None:
        core = self.core
        if core.table.get(entry.name) is not entry or not entry.idle_expired(
            core.clock(), core.config.idle_ttl
        ):
            return
        try:
            if entry.can_park and can_park_within(
                resident(entry), core.table.residents(exclude=entry), core.budgets, core.external()
            ):
                await self.transitions.park(entry, reason="idle")
            else:
                await self.transitions.unload(entry, reason="idle")
        except UnloadFailed as exc:
            core.problem(f"unload:{entry.name}", exc, entry.name)

    async def refresh(self) -> None:
        """Re-arm the runtime's own expiry for models the manager keeps (Ollama)."""
        core = self.core
        now = core.clock()
        failed: Exception | None = None
        for entry in core.table:
            provider = core.providers.get(entry.provider)
            if (
                provider is None
                or not provider.capabilities.refresh
                or entry.handle is None
                or not entry.owned
                or entry.state is not State.READY
            ):
                continue
            expires = entry.expires_in(now, core.config.idle_ttl)
            try:
                await provider.refresh(entry.handle, math.inf if expires is None else expires)
            except Exception as exc:
                log.warning("refreshing %s failed: %s", entry.name, exc)
                failed = exc
        if failed is not None:
            raise failed


__all__ = ["Reaper"]
