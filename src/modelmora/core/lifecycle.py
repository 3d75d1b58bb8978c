"""An entry's lifecycle: its states, the transition table, and the one function that
moves an entry from one state to the next.

Like h11's ``_state.py``, everything that changes an entry's state or the memory it is
counted for lives here.  The allowed moves are a table from ``(state, action)`` to the next
state; anything else raises :class:`IllegalTransition`, so a bug shows up as an error at
the faulty line instead of as a budget quietly overcommitted later.  Every transition
bumps the entry's ``generation`` (reconcile uses it to drop stale observations), wakes
whoever waits for the entry to change, and emits its event.

Memory an entry is counted for, by state (:meth:`Entry.held`)::

    QUEUED     nothing yet: waiting for admission
    LOADING    the reservation: max(estimate, last measurement), per device
    READY      what the load measured (the estimate when nothing was measured)
    PARKING    the active footprint and the warm copy, per device the larger
    SLEEPING   the warm copy (measured, else the active footprint moved to RAM)
    WAKING     the reservation for the woken model and the warm copy, per device the larger
    UNLOADING  what it held before, until the runtime has let go
    GONE       nothing: the entry has left the table
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from .. import events as ev
from ..footprint import EMPTY, Footprint
from ..spec import ModelSpec
from .gate import Gate
from .outcome import Attempt

if TYPE_CHECKING:
    from ..providers.base import Handle


class State(enum.StrEnum):
    QUEUED = "waiting"  # admission pending: holds no memory yet
    LOADING = "loading"  # memory reserved, the runtime is loading (or an adoption is getting ready)
    READY = "ready"
    PARKING = "parking"  # moving to the warm tier
    SLEEPING = "sleeping"  # warm tier (vLLM sleep, torch weights offloaded to RAM)
    WAKING = "waking"  # reserved, coming back from the warm tier
    UNLOADING = "unloading"  # holds its memory until the runtime returns
    GONE = "gone"  # left the table


class Action(enum.StrEnum):
    ADMIT = "admit"  # QUEUED → LOADING: memory reserved
    LOADED = "loaded"
    FAIL = "fail"  # a load or wake that did not happen, or failed
    PARK = "park"
    PARKED = "parked"
    PARK_FAILED = "park-failed"
    WAKE = "wake"  # SLEEPING → WAKING: admitted like a load
    WOKE = "woke"
    REQUEUE = "requeue"  # a reservation given back: its evictions failed
    UNLOAD = "unload"
    UNLOADED = "unloaded"
    UNLOAD_FAILED = "unload-failed"
    VANISH = "vanish"  # the runtime lost it (crash, eviction behind our back)
    SLEPT_BEHIND = "slept-behind"  # the runtime reports it parked on its own
    WOKE_BEHIND = "woke-behind"


S, A = State, Action
TRANSITIONS: dict[tuple[State, Action], State] = {
    (S.QUEUED, A.ADMIT): S.LOADING,
    (S.QUEUED, A.FAIL): S.GONE,
    (S.LOADING, A.LOADED): S.READY,
    (S.LOADING, A.FAIL): S.GONE,
    (S.LOADING, A.REQUEUE): S.QUEUED,
    (S.LOADING, A.SLEPT_BEHIND): S.SLEEPING,  # an adopted model that the runtime has parked
    (S.READY, A.PARK): S.PARKING,
    (S.PARKING, A.PARKED): S.SLEEPING,
    (S.PARKING, A.PARK_FAILED): S.READY,
    (S.SLEEPING, A.WAKE): S.WAKING,
    (S.WAKING, A.WOKE): S.READY,
    (S.WAKING, A.FAIL): S.GONE,
    (S.WAKING, A.REQUEUE): S.SLEEPING,
    (S.READY, A.UNLOAD): S.UNLOADING,
    (S.SLEEPING, A.UNLOAD): S.UNLOADING,
    (S.UNLOADING, A.UNLOADED): S.GONE,
    # UNLOAD_FAILED returns to the state it was unloaded from (Entry.prior)
    (S.READY, A.VANISH): S.GONE,
    (S.SLEEPING, A.VANISH): S.GONE,
    (S.READY, A.SLEPT_BEHIND): S.SLEEPING,
    (S.SLEEPING, A.WOKE_BEHIND): S.READY,
}
STABLE = frozenset({S.READY, S.SLEEPING})


class IllegalTransition(RuntimeError):
    """A transition the table does not allow: a bug in modelmora, never a user error."""


class Entry:
    """One model in the residency table.  Its ``state`` and memory fields are written only
    by :class:`Lifecycle`; its lease counters only by :mod:`modelmora.core.leases`;
    ``runtime_expires_at`` (neither: what the runtime last said) only by reconcile."""

    __slots__ = (
        "_changed",
        "attempt",
        "background",
        "can_park",
        "claims",
        "died",
        "estimate",
        "gate",
        "generation",
        "handle",
        "holders",
        "holds",
        "keep_alive",
        "key",
        "last_used",
        "loaded_at",
        "measured",
        "owned",
        "parked",
        "pinned",
        "placement",
        "prior",
        "runtime_expires_at",
        "spec",
        "state",
        "total_leases",
        "waiters",
    )

    def __init__(
        self,
        spec: ModelSpec,
        key: str,
        *,
        now: float,
        state: State = State.QUEUED,
        estimate: Footprint | None = None,
        measured: Footprint | None = None,
    ):
        self.spec = spec
        self.key = key  # the runtime's identity for the target (Provider.target_key)
        self.state = state
        self.prior = state
        self.generation = 0
        self.holders = 0  # leases granted
        # leases that say how long they are held (Lease.hold): id → (until, who), manager clock
        self.holds: dict[int, tuple[float, str]] = {}
        self.background = False  # a load that gives way: never evicts, parks or waits (baseline)
        self.waiters = 0  # callers waiting for it: to load, wake, park, unload, or at its gate
        self.total_leases = 0
        self.last_used = now
        self.loaded_at: float | None = None
        self.keep_alive: float | None = spec.keep_alive
        self.pinned = spec.pinned
        self.owned = True
        self.estimate = estimate if estimate is not None else Footprint(spec.memory)
        self.measured: Footprint | None = measured  # active footprint once measured
        self.parked: Footprint | None = None  # warm-tier footprint once measured
        self.can_park = False
        self.handle: Handle | None = None
        self.claims: tuple[Entry, ...] = ()  # models being evicted or parked to make room for it
        self.gate: Gate | None = None  # while admissions wait for its memory (admission.py)
        self.attempt = Attempt(settled=True)  # the current load, wake or adoption's outcome
        self.died: str | None = None  # its runtime died mid-transition: applied once it settles
        self.placement = ""  # why the planner put it on spec.device (device: auto / devices)
        # when the runtime itself lets it go (unix seconds, Observed.expires_at), as last observed
        self.runtime_expires_at: float | None = None
        self._changed = anyio.Event()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def provider(self) -> str:
        return self.spec.provider

    @property
    def leases(self) -> int:
        """Holders and callers waiting for it, in any state: nobody may unload, park or
        evict it without force (see :class:`~modelmora.core.gate.Gate` for the one
        exception)."""
        return self.holders + self.waiters

    # -- memory ---------------------------------------------------------------------------

    @property
    def active(self) -> Footprint:
        """What it holds when ready: measured, else estimated."""
        return self.measured if self.measured is not None else self.estimate

    @property
    def reservation(self) -> Footprint:
        """What admission reserves for a load or wake: the larger of estimate and the last
        measurement, per device."""
        return self.estimate.maximum(self.measured)

    @property
    def size_unknown(self) -> bool:
        """Nothing tells what a load of it will take: no estimate and no measurement."""
        return not self.spec.memory and self.measured is None

    @property
    def in_flight(self) -> bool:
        """A load or wake is under way (memory reserved, the runtime may be allocating)."""
        return self.state in (S.LOADING, S.WAKING)

    @property
    def warm(self) -> Footprint:
        """What it holds (or will hold) in its warm tier."""
        return self.parked if self.parked is not None else self.active.parked()

    def held(self) -> Footprint:
        """Bytes per device this entry is counted for now (see the module docstring)."""
        return self._held(self.state)

    def _held(self, state: State) -> Footprint:
        match state:
            case S.QUEUED | S.GONE:
                return EMPTY
            case S.LOADING:
                return self.reservation
            case S.READY:
                return self.active
            case S.PARKING:
                return self.active.maximum(self.warm)
            case S.SLEEPING:
                return self.warm
            case S.WAKING:
                return self.reservation.maximum(self.warm)
            case S.UNLOADING:
                return self._held(self.prior)

    def planned(self) -> Footprint:
        """What admission must count for this entry.  While the models it evicts or parks
        to make room are still going, their bytes are counted as theirs and only the rest
        of its reservation as its own: per device the larger of the two, which is what the
        device will hold at worst (the load starts only once they are gone)."""
        if self.claims and self.state in (S.LOADING, S.WAKING):
            freeing = EMPTY
            for victim in self.claims:
                freeing = freeing + victim.held()
            return self.held() - freeing
        return self.held()

    # -- questions --------------------------------------------------------------------------

    def is_evictable(self) -> bool:
        return self.state in STABLE and self.leases == 0 and not self.pinned

    def ttl(self, default: float) -> float:
        return default if self.keep_alive is None else self.keep_alive

    def idle_for(self, now: float) -> float:
        return now - self.last_used if self.leases == 0 else 0.0

    def expires_in(self, now: float, default_ttl: float) -> float | None:
        """Seconds until the reaper may let it go; None when it never expires."""
        if self.pinned or not self.owned or self.state is not S.READY:
            return None
        ttl = self.ttl(default_ttl)
        if math.isinf(ttl):
            return None
        if self.leases:
            return ttl
        return max(0.0, ttl - (now - self.last_used))

    def idle_expired(self, now: float, default_ttl: float) -> bool:
        if not self.is_evictable() or not self.owned or self.state is not S.READY:
            return False
        ttl = self.ttl(default_ttl)
        return not math.isinf(ttl) and now - self.last_used >= ttl

    async def changed(self) -> None:
        """Return after the entry's next transition."""
        await self._changed.wait()

    def __repr__(self) -> str:
        return (
            f"<Entry {self.name} {self.state.value} holders={self.holders} waiters={self.waiters}"
            f"{' pinned' if self.pinned else ''}{'' if self.owned else ' adopted'}>"
        )


class Lifecycle:
    """Applies transitions: the only writer of an entry's state and memory."""

    def __init__(self, bus: ev.EventBus, on_change: Callable[[], None]):
        self._bus = bus
        self._on_change = on_change  # wakes admissions waiting for memory
        self.moves: dict[str, int] = {}  # transitions per provider (reconcile's staleness check)

    def apply(self, entry: Entry, action: Action, event: ev.Event | None = None, **facts: Any) -> None:
        """Move ``entry`` by ``action``; ``facts`` update its memory and handle:
        ``measured``, ``parked``, ``estimate`` (Footprints), ``handle``, and
        ``claims`` (the entries evicted or parked to make room for this one)."""
        if action is A.UNLOAD_FAILED:
            if entry.state is not S.UNLOADING:
                raise IllegalTransition(f"{entry.name}: {action} from {entry.state}")
            to = entry.prior
        else:
            key = (entry.state, action)
            if key not in TRANSITIONS:
                raise IllegalTransition(f"{entry.name}: {action} is not allowed from {entry.state}")
            to = TRANSITIONS[key]
        for name, value in facts.items():
            if name not in ("measured", "parked", "estimate", "handle", "claims"):
                raise TypeError(f"unknown fact {name!r}")
            setattr(entry, name, value)
        if to not in (S.LOADING, S.WAKING):
            entry.claims = ()
        entry.prior, entry.state = entry.state, to
        entry.generation += 1
        self.moves[entry.provider] = self.moves.get(entry.provider, 0) + 1
        changed, entry._changed = entry._changed, anyio.Event()
        changed.set()
        if event is not None:
            self._bus.emit(event)
        self._on_change()

    def update(self, entry: Entry, **facts: Any) -> None:
        """New measurements for an entry that stays where it is (reconcile, rebalance), or
        its ``claims`` settled."""
        for name, value in facts.items():
            if name not in ("measured", "parked", "estimate", "claims"):
                raise TypeError(f"unknown fact {name!r}")
            setattr(entry, name, value)
        entry.generation += 1
        self._on_change()


__all__ = ["STABLE", "TRANSITIONS", "Action", "Entry", "IllegalTransition", "Lifecycle", "State"]
