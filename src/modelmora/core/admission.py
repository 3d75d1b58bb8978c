"""Admission: whether a load or a wake may start now, and fair waiting when it may not.

Loads and wakes go through the same door.  Each decision is a pure function of a snapshot
(:func:`~modelmora.core.planner.plan_admission` over the table's rows, the budgets, and a
fresh reading of what other processes hold), taken with no ``await`` between the snapshot
and the reservation it leads to, so two admissions can never both count the same free
bytes.  What is reserved is the larger of the model's estimate and its last measurement
(:attr:`Entry.reservation`); :meth:`Admission.decide` is also what ``ModelManager.plan``
answers, so a preview and the real admission can never disagree.

Waiting holds no lock: a waiting admission sleeps until the table changes, so a load that
fits is admitted at once even while another waits for memory (no head-of-line blocking).
While an admission waits for memory held by busy models, each of those models may grant
at most ``lease_bypass_limit`` new leases; after that new leases queue behind the waiter
(:meth:`Admission.may_bypass`), so traffic on a resident model cannot starve a model
queued for its memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import anyio

from .context import Core
from .lifecycle import Entry, State
from .planner import Admit, Candidate, Plan, plan_admission


class Admission:
    def __init__(self, core: Core):
        self.core = core
        # Decisions are taken one at a time, first come first served: a fresh reading, the
        # plan and the reservation it leads to.  Never held while waiting or evicting.
        self.turn = anyio.Lock()
        # admissions under way by arrival: memory that frees while one of them holds the turn
        # goes to the first in line that can take it, not to whoever holds the turn
        self._arrivals = itertools.count()
        self._queue: dict[Entry, int] = {}

    def candidate(self, entry: Entry, memory: Iterable[tuple[str, int]] | None = None) -> Candidate:
        """What ``entry`` will hold once admitted: a load's reservation, or for a wake the
        reservation together with the warm copy, which stays until the wake completes."""
        if memory is not None:
            need = dict(memory)
        elif entry.state in (State.SLEEPING, State.WAKING):
            need = entry.reservation.maximum(entry.warm).as_dict()
        else:
            need = entry.reservation.as_dict()
        return Candidate(entry.name, need, entry.spec.group, key=f"{entry.provider}/{entry.key}")

    def decide(self, entry: Entry, candidate: Candidate | None = None) -> Plan:
        """The plan for admitting ``entry`` now (pure: reads the snapshot, changes nothing)."""
        core = self.core
        return plan_admission(
            core.table.residents(exclude=entry),
            candidate or self.candidate(entry),
            core.budgets,
            max_loaded=core.config.max_loaded_models,
            external=core.external(),
        )

    # -- fairness ---------------------------------------------------------------------------

    def arrive(self, entry: Entry) -> None:
        self._queue.setdefault(entry, next(self._arrivals))

    def leave(self, entry: Entry) -> None:
        self._queue.pop(entry, None)

    def first_in_line(self, entry: Entry) -> Entry | None:
        """An admission that arrived before ``entry``, is still wanted and could be admitted
        now: what it can take is its first (FIFO).  None when ``entry`` may go ahead, which
        it may past any earlier admission that still cannot be admitted (no head-of-line
        blocking)."""
        mine = self._queue.get(entry)
        if mine is None:
            return None
        for other, ticket in sorted(self._queue.items(), key=lambda item: item[1]):
            if ticket >= mine:
                break
            if (
                other.state in (State.QUEUED, State.SLEEPING)
                and other.leases > 0
                and self.core.table.get(other.name) is other
                and isinstance(self.decide(other), Admit)
            ):
                return other
        return None

    def block(self, names: Iterable[str]) -> list[Entry]:
        """``names`` hold memory a waiting admission needs: from now on each may grant
        only ``lease_bypass_limit`` more leases before new ones queue behind the waiter."""
        blocked = []
        for name in names:
            e = self.core.table.get(name)
            if e is None:
                continue
            if e.blocking == 0:
                e.bypass_left = self.core.config.lease_bypass_limit
                e.unblocked = anyio.Event()
            e.blocking += 1
            blocked.append(e)
        return blocked

    def unblock(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            e.blocking -= 1
            if e.blocking == 0:
                e.unblocked.set()

    @staticmethod
    def may_bypass(entry: Entry) -> bool:
        """Whether a new lease on ``entry`` may be granted now (see the module docstring)."""
        if entry.blocking == 0:
            return True
        if entry.bypass_left > 0:
            entry.bypass_left -= 1
            return True
        return False


__all__ = ["Admission"]
