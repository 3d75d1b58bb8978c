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
new leases only within the bounds of :mod:`modelmora.core.scheduling` (a count and a time
in seconds); after that new leases queue at its :class:`~modelmora.core.gate.Gate`, so
traffic on a resident model cannot starve a model queued for its memory.  Models loaded
less than ``min_residency`` ago count as busy for admissions that are not urgent.

A load whose size nothing tells (no estimate, no past measurement) is admitted alone on
its device: it waits while other loads or wakes are in flight there, reserves the free
headroom it finds, and keeps every other load there waiting until it has measured.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

import anyio

from ..footprint import Footprint
from .context import Core
from .lifecycle import Entry, State
from .planner import (
    Admit,
    Candidate,
    Plan,
    PlanError,
    Refuse,
    check_plan,
    placement_options,
    plan_admission,
    share_of,
)
from .scheduling import Scheduler

log = logging.getLogger("modelmora")


class Admission:
    def __init__(self, core: Core, scheduler: Scheduler):
        self.core = core
        self.scheduler = scheduler
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
        options = self.options(entry)
        if memory is not None:
            need = dict(memory)
        elif options:
            # one device's share (or a multi-GPU model's), whatever device an estimate or a
            # past load named
            gpus = entry.spec.gpus
            need = (
                Footprint(share_of(entry.estimate, options, gpus))
                .maximum(share_of(entry.measured or {}, options, gpus))
                .as_dict()
            )
        elif entry.state in (State.SLEEPING, State.WAKING):
            need = entry.reservation.maximum(entry.warm).as_dict()
        elif entry.size_unknown:
            need = {}  # the headroom an earlier decision reserved is not its size
        else:
            need = entry.reservation.as_dict()
        device = options[0] if options else entry.spec.device
        unknown = (device,) if entry.size_unknown and memory is None else ()
        return Candidate(
            entry.name,
            need,
            entry.spec.group,
            key=f"{entry.provider}/{entry.key}",
            unknown=unknown,
            options=options,
            gpus=entry.spec.gpus if options else 1,
        )

    def options(self, entry: Entry) -> tuple[str, ...]:
        """Devices the planner may place ``entry`` on: none once it holds memory somewhere
        (loading, ready, parked: it stays where it is), else its ``devices``, or for
        ``device: auto`` every GPU with a budget, or the CPU when no GPU has one."""
        if entry.state is not State.QUEUED:
            return ()
        return placement_options(entry.spec, self.core.budgets)

    def decide(self, entry: Entry, candidate: Candidate | None = None) -> Plan:
        """The plan for admitting ``entry`` now (pure: reads the snapshot, changes nothing),
        checked against every budget before anyone can execute it: a plan that does not
        fit is a bug, logged and answered with a refusal, never carried out."""
        core = self.core
        residents = self.scheduler.protect_young(core.snapshot(exclude=entry, deciding=entry.name), entry)
        candidate = candidate or self.candidate(entry)
        external = core.external()
        max_loaded = core.config.max_loaded_models
        plan = plan_admission(
            residents,
            candidate,
            core.budgets,
            max_loaded=max_loaded,
            external=external,
            external_detail=core.external_detail(external) if external else None,
            eviction=core.config.eviction,
        )
        try:
            check_plan(residents, candidate, plan, core.budgets, max_loaded=max_loaded, external=external)
        except PlanError as exc:
            log.error("modelmora's planner made a plan that does not fit (a bug; refused): %s", exc)
            return Refuse(f"internal error, the load is refused rather than overcommit: {exc}")
        return plan

    # -- fairness ---------------------------------------------------------------------------

    def arrive(self, entry: Entry) -> None:
        self._queue.setdefault(entry, next(self._arrivals))

    def leave(self, entry: Entry) -> None:
        self._queue.pop(entry, None)

    def first_in_line(self, entry: Entry) -> Entry | None:
        """An admission ranked before ``entry`` (by its requests' priority levels, then by
        arrival: :meth:`Scheduler.rank`), still wanted and that could be admitted now: what it
        can take is its first.  None when ``entry`` may go ahead, which it may past any
        earlier admission that still cannot be admitted (no head-of-line blocking)."""
        arrival = self._queue.get(entry)
        if arrival is None:
            return None
        now = self.core.clock()
        mine = self.scheduler.rank(entry.name, arrival, now)
        ranked = sorted(
            ((self.scheduler.rank(e.name, a, now), e) for e, a in self._queue.items() if e is not entry),
            key=lambda item: item[0],
        )
        for rank, other in ranked:
            if rank >= mine:
                break
            if (
                other.state in (State.QUEUED, State.SLEEPING)
                and other.leases > 0
                and self.core.table.get(other.name) is other
                and isinstance(self.decide(other), Admit)
            ):
                return other
        return None

    def block(self, admission: Entry, names: Iterable[str]) -> list[Entry]:
        """``names`` hold memory the waiting ``admission`` needs: from now on each grants new
        leases only within the scheduling bounds before new ones queue at its gate."""
        blocked = []
        for name in names:
            e = self.core.table.get(name)
            if e is None:
                continue
            if e.gate is None:
                e.gate = self.scheduler.open_gate(admission)
            e.gate.admissions.add(admission.name)
            blocked.append(e)
        return blocked

    def unblock(self, admission: Entry, entries: Iterable[Entry]) -> None:
        for e in entries:
            gate = e.gate
            if gate is None:
                continue
            gate.admissions.discard(admission.name)
            if not gate.admissions:
                e.gate = None
                gate.opened.set()


__all__ = ["Admission"]
