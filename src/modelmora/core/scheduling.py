"""Scheduling of requests: who is served first when a model is busy or must be swapped in.

Every caller that cannot take its lease at once holds a :class:`Ticket` while it waits:
its model, priority, API key and weight, and since when it waits.  The
:class:`Scheduler` answers four questions from the tickets, the table and
``config.scheduling`` (:class:`~modelmora.config.SchedulingConfig`), always with no
``await``:

* **Swap-aware admission (collation).**  While a load waits for memory that busy models
  hold, each of them has a :class:`~modelmora.core.gate.Gate`: it may still grant
  ``max_batch_before_swap`` more leases, and none once the waiting load's first request has
  waited ``max_wait`` seconds; then the swap happens as soon as the leases in flight end.
  A queue ``A B A B`` is so served ``A A … B B …``, and no request waits longer than
  ``max_wait`` while requests of no higher priority for other models are served ahead of
  it (the starvation bound).  A request of higher priority than the waiting load passes
  the gate.
* **Thrash bound.**  A model loaded less than ``min_residency`` seconds ago counts as busy
  for the admission of a load of no higher priority that has waited less than
  ``max_wait``: that load waits rather than evict it.
* **Priorities with ageing and weighted fair shares.**  A ticket's level is its priority
  (the request's, else its model's ``priority``) plus one per ``ageing`` seconds waited.
  Callers in line for a model at its ``max_concurrency`` are served by level, highest
  first, and within a level by weighted fair queuing between API keys (start-time fair
  queuing: each ticket's tag is ``max(virtual time, its key's last tag) + 1 / weight``,
  lowest tag first; Goyal, Vin and Cheng, SIGCOMM 1996), then by arrival.  Admissions
  waiting for memory take freed memory by the level of their best ticket, then by arrival.
* **Back-pressure.**  A request for a model whose line already holds ``max_queue``
  requests, or that would wait past ``max_wait`` for one of its ``max_concurrency`` slots,
  is refused at once with :class:`~modelmora.errors.Overloaded`.  The wait is predicted
  from the model's measured service time (an exponentially weighted mean of how long its
  leases were held) and, when it is not ready, its measured load time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from ..config import SchedulingConfig
from ..errors import Overloaded
from ..spec import ModelSpec, format_duration
from .context import Core
from .gate import Gate
from .lifecycle import Entry, State
from .planner import Resident

# weight of the newest lease in the mean service time (exponentially weighted)
SERVICE_ALPHA = 0.3


@dataclass(eq=False, slots=True)
class Ticket:
    """One caller waiting for a lease on ``model``."""

    model: str
    priority: int
    key: str
    weight: float
    since: float  # clock seconds when it began to wait
    seq: int  # arrival order
    passed: bool = False  # through the model's gate (or no gate was in its way)
    tag: float | None = None  # start-time fair queuing tag once in line for a slot
    start: float = 0.0
    in_line: bool = field(default=False)  # waits for one of the model's max_concurrency slots


class Scheduler:
    """The scheduling policy of one running manager (see the module docstring)."""

    def __init__(self, core: Core):
        self.core = core
        self.tickets: dict[str, list[Ticket]] = {}
        self.service: dict[str, float] = {}  # mean seconds a lease is held, per model
        self._seq = itertools.count()
        self._vtime: dict[str, float] = {}  # virtual time of each model's line
        self._last_tag: dict[tuple[str, str], float] = {}  # per (model, key)

    @property
    def config(self) -> SchedulingConfig:
        return self.core.config.scheduling

    # -- tickets ------------------------------------------------------------------------------

    def arrive(self, spec: ModelSpec, *, priority: int | None, key: str | None, weight: float) -> Ticket:
        """A ticket for a caller that must wait for ``spec``; raises :class:`Overloaded`
        (registering nothing) when its line is full or the wait it predicts exceeds
        ``max_wait``."""
        self.check_load(spec)
        ticket = Ticket(
            spec.name,
            spec.priority if priority is None else priority,
            key or "",
            weight if weight > 0 else 1.0,
            self.core.clock(),
            next(self._seq),
        )
        self.tickets.setdefault(spec.name, []).append(ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        line = self.tickets.get(ticket.model)
        if line is not None and ticket in line:
            line.remove(ticket)
            if not line:
                del self.tickets[ticket.model]
        if ticket.in_line:
            self.core.notify()  # the next in line may go

    def waiting(self, name: str) -> int:
        """Requests waiting for ``name`` (for a load, at its gate, or for a slot)."""
        return len(self.tickets.get(name, ()))

    def level(self, ticket: Ticket, now: float) -> int:
        """The ticket's priority plus one per ``ageing`` seconds it has waited."""
        return ticket.priority + math.floor(max(0.0, now - ticket.since) / self.config.ageing)

    def urgency(self, name: str, now: float) -> int:
        """The level of the best ticket waiting for ``name``; its model's priority when none
        does (a prefetch, a warm-up)."""
        line = self.tickets.get(name)
        if not line:
            spec = self.core.specs.get(name)
            return spec.priority if spec is not None else 0
        return max(self.level(t, now) for t in line)

    def waited(self, name: str, now: float) -> float:
        """How long the longest-waiting request for ``name`` has waited (seconds)."""
        line = self.tickets.get(name)
        return max((now - t.since for t in line), default=0.0) if line else 0.0

    # -- swap-aware admission -------------------------------------------------------------------

    def open_gate(self, admission: Entry) -> Gate:
        """A gate on a busy model whose memory ``admission`` waits for: its time bound counts
        from when the admission's first request began to wait."""
        now = self.core.clock()
        return Gate(self.config.max_batch_before_swap, since=now - self.waited(admission.name, now))

    def may_pass(self, gate: Gate, ticket: Ticket) -> bool:
        """Whether ``ticket`` may take a lease on a model whose memory the gate's admissions
        wait for (and count it against the batch bound)."""
        now = self.core.clock()
        blocking = max((self.urgency(name, now) for name in gate.admissions), default=None)
        if blocking is not None and self.level(ticket, now) > blocking:
            return True  # a more urgent request is not held behind a less urgent swap
        if blocking is not None:
            gate.since = min(gate.since, now - max(self.waited(name, now) for name in gate.admissions))
        if now - gate.since >= self.config.max_wait:
            return False
        return gate.may_pass()

    def rank(self, name: str, arrival: int, now: float) -> tuple[int, int]:
        """Order of admissions waiting for memory: best level first, then arrival."""
        return (-self.urgency(name, now), arrival)

    def protect_young(self, residents: Iterable[Resident], admission: Entry) -> list[Resident]:
        """``residents`` with every model loaded less than ``min_residency`` ago marked busy,
        unless the admission is urgent: a level above that model's priority, or a request
        that has waited ``max_wait``."""
        residents = list(residents)
        floor = self.config.min_residency
        if floor <= 0:
            return residents
        now = self.core.clock()
        if self.waited(admission.name, now) >= self.config.max_wait:
            return residents
        level = self.urgency(admission.name, now)
        out = []
        for r in residents:
            e = self.core.table.get(r.name)
            if (
                e is not None
                and e.state is State.READY
                and e.loaded_at is not None
                and now - e.loaded_at < floor
                and level <= e.spec.priority
                and r.leases == 0
            ):
                r = replace(r, leases=1)  # young: the planner waits for it instead of evicting it
            out.append(r)
        return out

    # -- concurrency ------------------------------------------------------------------------------

    def has_slot(self, entry: Entry, ticket: Ticket) -> bool:
        """Whether ``ticket`` may take one of ``entry``'s ``max_concurrency`` slots now: one
        is free and no ticket ranked before it waits for one.  Puts it in line otherwise."""
        limit = entry.spec.max_concurrency
        if limit is None:
            return True
        if not ticket.in_line:
            ticket.in_line = True
            vtime = self._vtime.get(ticket.model, 0.0)
            ticket.start = max(vtime, self._last_tag.get((ticket.model, ticket.key), 0.0))
            ticket.tag = ticket.start + 1.0 / ticket.weight
            self._last_tag[(ticket.model, ticket.key)] = ticket.tag
        free = limit - entry.holders
        if free <= 0:
            return False
        now = self.core.clock()
        line = sorted(
            (t for t in self.tickets.get(ticket.model, ()) if t.in_line),
            key=lambda t: (-self.level(t, now), t.tag, t.seq),
        )
        if ticket not in line[:free]:
            return False
        self._vtime[ticket.model] = max(self._vtime.get(ticket.model, 0.0), ticket.start)
        return True

    def in_line(self, name: str) -> bool:
        """Someone waits for one of ``name``'s slots (the hot path may not pass them)."""
        return any(t.in_line for t in self.tickets.get(name, ()))

    # -- back-pressure --------------------------------------------------------------------------

    def released(self, name: str, held: float) -> None:
        """A lease on ``name`` was held ``held`` seconds: the mean service time moves."""
        held = max(0.0, held)
        old = self.service.get(name)
        self.service[name] = held if old is None else old + SERVICE_ALPHA * (held - old)

    def predicted_wait(self, spec: ModelSpec) -> float | None:
        """Seconds a new request for ``spec`` is expected to wait: the rounds of its
        ``max_concurrency`` slots ahead of it times the mean service time, plus its load
        time when it is not ready; None when nothing measured predicts it."""
        entry = self.core.table.get(spec.name)
        ready = entry is not None and entry.state is State.READY
        load = 0.0 if ready else self.core.reload_seconds(spec.name)
        limit, service = spec.max_concurrency, self.service.get(spec.name)
        if limit is None or service is None:
            return None
        in_flight = entry.holders if entry is not None else 0
        ahead = self.waiting(spec.name) + 1 - max(0, limit - in_flight)
        return load + math.ceil(max(0, ahead) / limit) * service

    def check_load(self, spec: ModelSpec) -> None:
        """Raise :class:`Overloaded` when a new request for ``spec`` finds its line full
        (``max_queue``) or would wait past ``max_wait`` for a slot."""
        waiting = self.waiting(spec.name)
        entry = self.core.table.get(spec.name)
        in_flight = entry.holders if entry is not None else 0
        # a request that finds nobody ahead of it (it starts the load, or takes a free slot)
        # is never refused: ``max_queue: 0`` lets none wait behind others
        full = spec.max_queue is not None and waiting >= spec.max_queue and (waiting or in_flight)
        wait = self.predicted_wait(spec)
        slow = wait is not None and wait > self.config.max_wait
        if not (full or slow):
            return
        if wait is None:  # nothing measured yet: about one load or one service time
            wait = self.service.get(spec.name) or self.core.reload_seconds(spec.name)
        if full:
            why = f"its queue is full (max_queue {spec.max_queue})"
        else:
            why = (
                f"it would wait about {format_duration(wait)}, past max_wait "
                f"({format_duration(self.config.max_wait)})"
            )
        raise Overloaded(
            f"{spec.name!r} is overloaded: {in_flight} in flight, {waiting} waiting; {why}",
            model=spec.name,
            retry_after=max(1.0, wait),
            in_flight=in_flight,
            waiting=waiting,
        )


__all__ = ["Scheduler", "Ticket"]
