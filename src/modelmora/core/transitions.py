"""Unload, park, discard and runtime deaths against providers, with the cancellation rules.

Each operation has a synchronous first half that moves the entry (through
:class:`~modelmora.core.lifecycle.Lifecycle`) and an awaited second half that calls the
runtime.  Admission decides and the first halves run with no ``await`` in between, so the
table never counts the same bytes twice (loads and wakes: :mod:`modelmora.core.loading`).

* unloads and parks run shielded from cancellation and bounded by ``unload_timeout``: a
  runtime is never left half-released because a caller went away; a park that fails
  becomes an unload;
* a model whose runtime dies (``Provider.watch`` returns, ``Provider.report_lost``)
  leaves the table at once with a ``Vanished`` event; its holders' handles are closed.
  A death reported while the model parks, wakes or unloads is kept (``Entry.died``) and
  applied as soon as that transition settles (:meth:`Transitions.settle`), whatever the
  runtime's call answered.
"""

from __future__ import annotations

import logging
from typing import TypeVar

import anyio

from .. import events as ev
from ..errors import (
    UnloadFailed,
)
from ..footprint import Footprint
from ..providers.base import Handle
from ..spec import format_duration
from .context import Core
from .lifecycle import STABLE, Action, Entry, State

log = logging.getLogger("modelmora")
T = TypeVar("T")


class Transitions:
    def __init__(self, core: Core):
        self.core = core
        self._watchers: dict[Entry, anyio.CancelScope] = {}
        self._unload_reason: dict[Entry, str] = {}
        self._evicted_for: dict[Entry, Entry | None] = {}
        self._forced: set[Entry] = set()  # unloads that break leases

    # -- unload, park, discard --------------------------------------------------------------------

    def begin_unload(
        self,
        entry: Entry,
        *,
        reason: str,
        force: bool = False,
        evicted_for: Entry | None = None,
    ) -> None:
        """READY/SLEEPING → UNLOADING; ``finish_unload`` completes it."""
        forced = force and entry.leases > 0
        if forced:
            self._forced.add(entry)
        if evicted_for is not None:
            self.core.bus.emit(ev.Evicted(model=entry.name, for_model=evicted_for.name, reason=reason))
        self.unwatch(entry)
        self.core.lifecycle.apply(
            entry, Action.UNLOAD, ev.Unloading(model=entry.name, reason=reason, forced=forced)
        )
        self._unload_reason[entry] = reason

    async def finish_unload(self, entry: Entry) -> Footprint:
        core = self.core
        reason = self._unload_reason.pop(entry, "")
        forced = entry in self._forced
        self._forced.discard(entry)
        started = core.clock()
        held = entry.held()
        try:
            with anyio.CancelScope(shield=True), core.transition():
                await core.hooks.before("before_unload", entry.spec)  # bounded; never raises
                with anyio.move_on_after(core.config.unload_timeout) as scope:
                    freed = await core.provider(entry.provider).unload(entry.handle) if entry.handle else {}
                if scope.cancelled_caught:
                    raise UnloadFailed(
                        f"unloading {entry.name!r} took longer than the unload_timeout of "
                        f"{format_duration(core.config.unload_timeout)}",
                        model=entry.name,
                        provider=entry.provider,
                    )
        except Exception as exc:
            core.lifecycle.apply(entry, Action.UNLOAD_FAILED)
            if self.settle(entry):  # its runtime died meanwhile: nothing is left to unload
                return held
            self.watch(entry)
            if isinstance(exc, UnloadFailed):
                raise
            raise UnloadFailed(
                f"unloading {entry.name!r} failed: {exc}", model=entry.name, provider=entry.provider
            ) from exc
        if entry.handle is not None:
            entry.handle.close()
        self.leave(
            entry,
            Action.UNLOADED,
            ev.Unloaded(
                model=entry.name,
                reason=reason,
                duration_s=core.clock() - started,
                freed=dict(freed) or held.as_dict(),
                forced=forced,
            ),
        )
        await core.hooks.after("after_unload", entry.spec)
        return Footprint(freed) if freed else held

    async def unload(
        self, entry: Entry, *, reason: str, force: bool = False, evicted_for: Entry | None = None
    ) -> Footprint:
        self.begin_unload(entry, reason=reason, force=force, evicted_for=evicted_for)
        return await self.finish_unload(entry)

    def begin_park(self, entry: Entry, *, evicted_for: Entry | None = None) -> None:
        self.core.lifecycle.apply(entry, Action.PARK)
        self._evicted_for[entry] = evicted_for

    async def finish_park(self, entry: Entry, *, reason: str) -> bool:
        """PARKING → SLEEPING; True once parked.  If the runtime cannot, the model is
        unloaded instead — unless a caller now waits for it: then it stays ready (False),
        and whoever wanted its memory decides again."""
        core = self.core
        evicted_for = self._evicted_for.pop(entry, None)
        started = core.clock()
        assert entry.handle is not None
        try:
            with anyio.CancelScope(shield=True), core.transition():
                with anyio.move_on_after(core.config.unload_timeout) as scope:
                    held = await core.provider(entry.provider).sleep(entry.handle)
                if scope.cancelled_caught:
                    raise TimeoutError(
                        f"parking took longer than {format_duration(core.config.unload_timeout)}"
                    )
        except Exception as exc:
            core.lifecycle.apply(entry, Action.PARK_FAILED)
            if self.settle(entry):  # its runtime died meanwhile: nothing is left to unload
                return True
            gate = entry.gate
            waiting = entry.leases
            if gate is not None and evicted_for is not None and evicted_for.name in gate.admissions:
                waiting -= gate.queued  # they yield to the admission this park is for
            if waiting:
                log.warning("parking %s failed (%s); kept ready: a caller waits for it", entry.name, exc)
                return False
            log.warning("parking %s failed (%s); unloading it instead", entry.name, exc)
            self.begin_unload(entry, reason=f"{reason}; warm tier failed", evicted_for=evicted_for)
            await self.finish_unload(entry)
            return True
        parked = Footprint(held) if held else entry.active.parked()
        core.lifecycle.apply(
            entry,
            Action.PARKED,
            ev.Slept(
                model=entry.name, reason=reason, duration_s=core.clock() - started, memory=parked.as_dict()
            ),
            parked=parked,
        )
        self.settle(entry)
        return True

    async def park(self, entry: Entry, *, reason: str) -> bool:
        self.begin_park(entry)
        return await self.finish_park(entry, reason=reason)

    async def discard(self, entry: Entry) -> bool:
        """Best-effort cleanup of a model whose runtime state is unknown after a failed
        load or wake: ``Provider.unload`` of its handle, or ``Provider.discard`` of its
        spec when the load never returned one.  Shielded, bounded by ``unload_timeout``
        (seconds); the entry keeps its memory counted meanwhile (the caller moves it on
        afterwards).  Never raises: returns False when the cleanup failed or timed out
        (logged), so the runtime may still hold the model."""
        handle = entry.handle
        done = False
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.core.config.unload_timeout):
            try:
                provider = self.core.provider(entry.provider)
                if handle is not None:
                    await provider.unload(handle)
                else:
                    await provider.discard(entry.spec)
                done = True
            except Exception as exc:
                log.warning("cleaning up %s after a failure also failed: %s", entry.name, exc)
        if not done:
            log.warning("%s may still be held by its runtime after a failure", entry.name)
        if handle is not None:
            handle.close()
        return done

    def leave(self, entry: Entry, action: Action, event: ev.Event | None = None) -> None:
        """A transition to GONE: the entry leaves the table in the same step."""
        self.unwatch(entry)
        self.core.table.remove(entry)
        self.core.lifecycle.apply(entry, action, event)

    # -- runtime deaths -------------------------------------------------------------------------

    def vanish(self, entry: Entry, reason: str) -> None:
        """The runtime no longer has ``entry`` (crashed, evicted behind our back).  While
        it parks, wakes or unloads, the death is kept and applied by :meth:`settle` once
        that transition is over."""
        if self.core.table.get(entry.name) is not entry or entry.state is State.GONE:
            return
        if entry.state not in STABLE:
            log.warning("%s is gone from its runtime while %s: %s", entry.name, entry.state.value, reason)
            entry.died = reason
            return
        if entry.handle is not None:
            entry.handle.close()
        log.warning("%s is gone from its runtime: %s", entry.name, reason)
        self.leave(
            entry, Action.VANISH, ev.Vanished(model=entry.name, provider=entry.provider, leased=entry.holders)
        )

    def settle(self, entry: Entry) -> bool:
        """Apply a death reported while ``entry`` was in transition, now that it is READY
        or SLEEPING again; True when it left the table."""
        if entry.died is None or entry.state not in STABLE:
            return False
        reason, entry.died = entry.died, None
        self.vanish(entry, reason)
        return entry.state is State.GONE

    def lost(self, handle: Handle, reason: str) -> None:
        """``Provider.report_lost``: find the entry that holds ``handle`` and drop it."""
        entry = self.core.table.get(handle.name)
        if entry is not None and entry.handle is handle:
            self.vanish(entry, reason)

    def watch(self, entry: Entry) -> None:
        """Notice at once when the runtime behind ``entry`` dies (``Capabilities.watch``)."""
        provider = self.core.providers.get(entry.provider)
        handle = entry.handle
        if provider is None or not provider.capabilities.watch or handle is None or self.core.tg is None:
            return
        self.unwatch(entry)
        scope = self._watchers[entry] = anyio.CancelScope()
        self.core.spawn(
            lambda: self._watch(entry, handle, scope), name=f"modelmora-watch-{entry.name}", service=True
        )

    def unwatch(self, entry: Entry) -> None:
        scope = self._watchers.pop(entry, None)
        if scope is not None:
            scope.cancel()

    async def _watch(self, entry: Entry, handle: Handle, scope: anyio.CancelScope) -> None:
        with scope:
            try:
                reason = await self.core.provider(entry.provider).watch(handle)
            except Exception as exc:  # a watcher that fails must not take the manager down
                self.core.problem(f"watch:{entry.name}", exc, entry.name)
                return
            if self._watchers.get(entry) is scope:
                del self._watchers[entry]
            if entry.handle is handle:
                self.vanish(entry, reason)


__all__ = ["Transitions"]
