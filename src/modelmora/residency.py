"""The residency table's rows: one :class:`Entry` per model resident or in transition.

The table is the manager's only mutable state.  Entries answer questions about
themselves (``is_evictable``, ``idle_expired``) so that nobody pokes at their fields, and
turn into frozen :class:`~modelmora.planner.Resident` snapshots for the pure planner.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio

from .spec import ModelSpec

if TYPE_CHECKING:
    from .providers.base import Handle


class State(enum.StrEnum):
    WAITING = "waiting"  # admission pending: holds no memory yet
    LOADING = "loading"  # memory reserved, provider loading
    READY = "ready"
    PARKING = "parking"  # moving to the warm tier
    SLEEPING = "sleeping"  # warm tier (weights parked, e.g. vLLM sleep / torch offload)
    WAKING = "waking"  # coming back from the warm tier (admitted like a load)
    UNLOADING = "unloading"  # still holds memory until the provider returns

    @property
    def holds_memory(self) -> bool:
        return self is not State.WAITING


def parked(memory: Mapping[str, int], *, keep_weights: bool = True) -> dict[str, int]:
    """Memory once a model is parked in its warm tier: nothing left on accelerators, and its
    accelerator weights added to host RAM (or dropped, ``keep_weights=False``: vLLM level 2)."""
    accelerators = sum(n for d, n in memory.items() if d != "cpu")
    return {
        **{d: 0 for d in memory if d != "cpu"},
        "cpu": memory.get("cpu", 0) + (accelerators if keep_weights else 0),
    }


class Entry:
    """One model in the table.  ``leases`` counts holders and callers waiting for it."""

    __slots__ = (
        "active_memory",
        "can_sleep",
        "error",
        "forced",
        "gone",
        "handle",
        "keep_alive",
        "last_used",
        "leases",
        "loaded_at",
        "memory",
        "owned",
        "pinned",
        "provider",
        "ready",
        "settled",
        "sleep_memory",
        "spec",
        "state",
        "total_leases",
    )

    def __init__(self, spec: ModelSpec, provider: str, *, state: State = State.WAITING):
        self.spec = spec
        self.provider = provider
        self.state = state
        self.leases = 0
        self.total_leases = 0
        self.last_used = time.monotonic()
        self.loaded_at: float | None = None
        self.handle: Handle | None = None
        self.memory: dict[str, int] = dict(spec.memory)  # held now
        self.active_memory: dict[str, int] = dict(spec.memory)  # held when ready (estimate → measured)
        self.sleep_memory: dict[str, int] | None = None  # held in the warm tier, once measured
        self.can_sleep = False  # warm_tier requested and the provider has one
        self.settled = anyio.Event()  # set when a park (READY → SLEEPING) finishes
        self.pinned = spec.pinned
        self.keep_alive: float | None = spec.keep_alive
        self.owned = True
        self.ready = anyio.Event()  # set when the load settles (ready or failed)
        self.gone = anyio.Event()  # set when the entry leaves the table
        self.error: BaseException | None = None
        self.forced = False

    @property
    def name(self) -> str:
        return self.spec.name

    def is_evictable(self) -> bool:
        return self.state in (State.READY, State.SLEEPING) and self.leases == 0 and not self.pinned

    def ttl(self, default: float) -> float:
        return default if self.keep_alive is None else self.keep_alive

    def idle_for(self, now: float) -> float:
        return now - self.last_used if self.leases == 0 else 0.0

    def expires_in(self, now: float, default_ttl: float) -> float | None:
        """Seconds until the reaper may unload it; None when it never expires."""
        if self.pinned or not self.owned or self.state is not State.READY:
            return None
        ttl = self.ttl(default_ttl)
        if math.isinf(ttl):
            return None
        if self.leases:
            return ttl
        return max(0.0, ttl - (now - self.last_used))

    def idle_expired(self, now: float, default_ttl: float) -> bool:
        if not self.is_evictable() or not self.owned or self.state is not State.READY:
            return False
        ttl = self.ttl(default_ttl)
        return not math.isinf(ttl) and now - self.last_used >= ttl

    def parked_memory(self) -> dict[str, int]:
        """What the model holds in the warm tier: measured, else everything moved to RAM."""
        if self.sleep_memory is not None:
            return dict(self.sleep_memory)
        return parked(self.active_memory)

    def resident(self) -> Resident:
        from .planner import Resident

        return Resident(
            name=self.name,
            memory=dict(self.memory),
            state=self.state,
            leases=self.leases,
            pinned=self.pinned,
            group=self.spec.group,
            last_used=self.last_used,
            sleep_memory=self.parked_memory() if self.can_sleep else None,
        )

    def __repr__(self) -> str:
        return (
            f"<Entry {self.name} {self.state.value} leases={self.leases}"
            f"{' pinned' if self.pinned else ''}{'' if self.owned else ' adopted'}>"
        )


if TYPE_CHECKING:
    from .planner import Resident

__all__ = ["Entry", "State"]
