"""Leases: ``async with manager.use(name) as handle`` takes one reference on a model.

The hot path — a lease on a ready model that blocks nobody — is a few attribute updates
and one event, with no ``await``.  Everything else (first use, a parked model, a model
being loaded, unloaded or parked, a model whose memory another admission waits for) takes
the slow path: it joins or starts the one load of the model (singleflight) and waits for
it to settle.  Callers waiting for a load are counted apart from holders, and both keep
the model from being unloaded without force.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

import anyio

from .. import events as ev
from ..errors import ModelMoraTimeout
from ..providers.base import Handle
from ..spec import format_duration
from .context import Core
from .gate import Gate
from .lifecycle import Entry, State
from .loading import Loader
from .outcome import Result
from .scheduling import Scheduler, Ticket

T = TypeVar("T")


class Lease:
    """One reference on a resident model; ``loaded_here`` says whether taking it caused the
    model's load (ownership for callers such as a chain that clean up what they loaded).
    It is set the moment the load starts, so a caller cancelled while waiting still knows
    the load it left running is its own."""

    __slots__ = (
        "_entry", "_keep_alive", "_key", "_leases", "_name", "_priority", "_since", "_timeout", "_weight",
        "loaded_here",
    )  # fmt: skip

    def __init__(
        self,
        leases: Leases,
        name: str,
        timeout: float | None,
        keep_alive: float | None,
        *,
        priority: int | None = None,
        key: str | None = None,
        weight: float = 1.0,
    ):
        self._leases = leases
        self._name = name
        self._timeout = timeout
        self._keep_alive = keep_alive
        self._priority = priority
        self._key = key
        self._weight = weight
        self._entry: Entry | None = None
        self._since = 0.0
        self.loaded_here = False

    async def __aenter__(self) -> Handle:
        if self._entry is not None:
            raise RuntimeError("a Lease cannot be entered twice")
        entry = self._leases.try_hot(self._name, self._keep_alive)
        if entry is None:
            entry, self.loaded_here = await self._leases.acquire(
                self._name,
                timeout=self._timeout,
                keep_alive=self._keep_alive,
                on_start=self._started,
                priority=self._priority,
                key=self._key,
                weight=self._weight,
            )
        self._entry = entry
        self._since = self._leases.core.clock()
        assert entry.handle is not None
        return entry.handle

    def enter_now(self) -> Handle | None:
        """Take the lease only where that needs no wait — the model is ready and nobody waits
        for its memory (the hot path) — and return its handle; None otherwise, with nothing
        taken and no load started.  A lease taken here is left with ``__aexit__`` as usual."""
        if self._entry is not None:
            raise RuntimeError("a Lease cannot be entered twice")
        entry = self._leases.try_hot(self._name, self._keep_alive)
        if entry is None:
            return None
        self._entry = entry
        self._since = self._leases.core.clock()
        return entry.handle

    def _started(self) -> None:
        self.loaded_here = True

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def hold(self, who: str, seconds: float) -> None:
        """Say this granted lease is held ``seconds`` more (a lease over HTTP with a TTL;
        call again to extend): a load that needs its model's memory and cannot wait that
        long is refused at once (:class:`~modelmora.errors.HeldByLeases`, naming ``who``)
        instead of waiting out ``wait_timeout``.  RuntimeError unless granted."""
        if self._entry is None:
            raise RuntimeError("hold() needs a granted lease")
        self._entry.holds[id(self)] = (self._leases.core.clock() + seconds, who)

    def release(self) -> None:
        """Give the lease back (what ``__aexit__`` does, without an ``await``, so no
        cancellation can come between); idempotent: a second call does nothing."""
        entry, self._entry = self._entry, None
        if entry is not None:
            entry.holds.pop(id(self), None)
            self._leases.release(entry, held=self._leases.core.clock() - self._since)


class Leases:
    def __init__(self, core: Core, loader: Loader, scheduler: Scheduler):
        self.core = core
        self.loader = loader
        self.scheduler = scheduler
        self.on_idle: Callable[[Entry], None] = lambda entry: None  # set by the manager

    @staticmethod
    def _ttl(keep_alive: float | None) -> float | None:
        """A per-call keep-alive in seconds; negative means forever, as in the registry."""
        return None if keep_alive is None else math.inf if keep_alive < 0 else float(keep_alive)

    def try_hot(self, name: str, keep_alive: float | None) -> Entry | None:
        """The hot path: a lease on a ready model that blocks nobody, with no ``await``;
        None when the slow path is needed."""
        core = self.core
        entry = core.table.get(name)
        if entry is None or entry.state is not State.READY or entry.gate is not None or not core.running:
            return None
        if entry.spec.max_concurrency is not None and not self._slot_free(entry):
            return None
        entry.holders += 1
        entry.total_leases += 1
        entry.last_used = core.clock()
        core.requested(name)
        if keep_alive is not None:
            entry.keep_alive = self._ttl(keep_alive)
        if core.bus.wants_leases:
            core.bus.emit(ev.LeaseAcquired(model=name, leases=entry.holders))
        return entry

    def _slot_free(self, entry: Entry) -> bool:
        """Below its ``max_concurrency`` with nobody in line for a slot."""
        limit = entry.spec.max_concurrency
        return limit is None or (entry.holders < limit and not self.scheduler.in_line(entry.name))

    async def acquire(
        self,
        name: str,
        *,
        timeout: float | None = None,
        keep_alive: float | None = None,
        pin: bool = False,
        retry: bool = False,
        on_start: Callable[[], None] | None = None,
        priority: int | None = None,
        key: str | None = None,
        weight: float = 1.0,
        background: bool = False,
    ) -> tuple[Entry, bool]:
        """A granted lease on ``name``: (its entry, whether this call started its load).
        ``on_start`` is called when this call starts the load, before waiting for it.
        ``priority``, ``key`` and ``weight`` rank the caller while it waits
        (:mod:`modelmora.core.scheduling`); :class:`Overloaded` when it may not wait.
        A load every caller left (cancelled, timed out) is dropped or stopped.
        ``background``: a load this call starts gives way (LoadDeferred) rather than
        evict, park or wait, unless another caller comes to wait for it too."""
        core = self.core
        found = core.table.get(name)
        if (
            found is not None
            and found.state is State.READY
            and found.gate is None
            and core.running
            and self._slot_free(found)
        ):
            entry = found
            entry.holders += 1  # hot path: resident, nobody waits for its memory or a slot
            loaded_here = False
        else:
            core.check_open()
            ticket = self.scheduler.arrive(core.spec(name), priority=priority, key=key, weight=weight)
            try:
                with anyio.move_on_after(timeout) as scope:
                    entry, loaded_here = await self._slow(name, retry, on_start, ticket, background)
            finally:
                self.scheduler.leave(ticket)
            if scope.cancelled_caught:
                current = core.table.get(name)
                raise ModelMoraTimeout(
                    f"timed out after {format_duration(timeout)} waiting for {name!r} to load "
                    f"(state: {current.state.value if current else 'gone'})",
                    model=name,
                )
        entry.total_leases += 1
        entry.last_used = core.clock()
        if not background:  # a background load (baseline, prefetch) is nobody's request
            core.requested(name)
        if keep_alive is not None:
            entry.keep_alive = self._ttl(keep_alive)
        if pin:
            entry.pinned = True
        if core.bus.wants_leases:
            core.bus.emit(ev.LeaseAcquired(model=name, leases=entry.holders))
        return entry, loaded_here

    async def _slow(
        self,
        name: str,
        retry: bool,
        on_start: Callable[[], None] | None,
        ticket: Ticket,
        background: bool = False,
    ) -> tuple[Entry, bool]:
        core = self.core
        core.check_open()
        spec = core.spec(name)
        loaded_here = False
        with core.waiting():  # shutdown answers this wait with ManagerClosed
            while True:
                core.check_open()
                entry = core.table.get(name)
                if entry is None:
                    core.provider(spec.provider)  # fail fast when its runtime is unavailable
                    self.loader.check_outage(spec.provider, name, retry)
                    self.loader.check_backoff(name, retry)
                    entry = core.new_entry(spec)
                    entry.background = background
                    core.table.add(entry)
                    self.loader.start_load(entry)
                    loaded_here = True
                    if on_start is not None:
                        on_start()
                elif entry.state is State.READY:
                    gate = entry.gate
                    if not ticket.passed:
                        if gate is not None and not self.scheduler.may_pass(gate, ticket):
                            await self._wait(entry, gate.opened.wait(), gate)  # behind the admission
                            continue
                        ticket.passed = True  # served before the swap: it counts against the batch
                    if self.scheduler.has_slot(entry, ticket):
                        entry.holders += 1
                        return entry, loaded_here
                    # in line for one of its max_concurrency slots: a release or a leave wakes it
                    await self._wait(entry, core.changed(core.config.reaper_interval))
                    continue
                elif entry.state is State.SLEEPING and entry.attempt.done:
                    self.loader.start_load(entry)  # wake it through admission
                elif entry.state in (State.UNLOADING, State.PARKING):
                    await self._wait(entry, entry.changed())
                    continue
                attempt = entry.attempt
                result = await self._wait(entry, attempt.wait())
                if (
                    result is Result.READY
                    and entry.state is State.READY
                    and core.table.get(name) is entry
                    and self.scheduler.has_slot(entry, ticket)
                ):
                    entry.holders += 1
                    return entry, loaded_here
                if result is Result.FAILED:
                    assert attempt.error is not None
                    raise attempt.error
                # AGAIN, or ready and then gone before this caller ran: look afresh

    async def _wait(self, entry: Entry, event: Awaitable[T], gate: Gate | None = None) -> T:
        """Wait for ``entry`` counted as one of its leases (``waiters``; at its gate also
        ``gate.queued``), whatever its state: nobody may unload, park, evict or reap a
        model a caller waits for."""
        entry.waiters += 1
        if gate is not None:
            gate.queued += 1
        try:
            return await event
        finally:
            entry.waiters -= 1
            if gate is not None:
                gate.queued -= 1
            if entry.holders == 0:
                self.core.notify()  # an admission may be waiting for nobody now
                if entry.waiters == 0:
                    self.loader.stop_unwanted(entry)  # a load nobody waits for any more

    def release(self, entry: Entry, held: float | None = None) -> None:
        """Give one lease on ``entry`` back; ``held``: for how many seconds it was held
        (the model's mean service time learns from it)."""
        core = self.core
        if entry.holders <= 0:
            raise RuntimeError(f"lease count of {entry.name!r} would go negative")
        entry.holders -= 1
        entry.last_used = core.clock()
        if held is not None:
            self.scheduler.released(entry.name, held)
        if entry.spec.max_concurrency is not None:
            core.notify()  # a slot is free: the first in line may take it
        if core.bus.wants_leases:
            core.bus.emit(ev.LeaseReleased(model=entry.name, leases=entry.holders))
        if entry.holders == 0:
            # an admission waits for nobody now (callers still queued at the model's gate
            # yield to the admissions they queue behind)
            core.notify()
            if entry.waiters == 0 and entry.state is State.READY and entry.ttl(core.config.idle_ttl) == 0:
                self.on_idle(entry)


__all__ = ["Lease", "Leases"]
