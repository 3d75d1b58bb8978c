"""Typed lifecycle events and the bus that delivers them to subscribers.

Every state change in the manager is an event; logging, metrics, progress bars and the
benchmark subscribe instead of the manager printing anything.  Subscribers are plain
callables; one that raises is logged and never breaks the manager.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

log = logging.getLogger("modelmora")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    model: str
    at: float = field(default_factory=time.time)

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, **asdict(self)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Waiting(Event):
    """A load waits for memory held by leased or transitioning models."""

    blockers: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Loading(Event):
    provider: str
    estimate: dict[str, int] = field(default_factory=dict)
    note: str = ""  # why the reservation is what it is, when that is not the estimate; placement's why
    device: str = ""  # the device it loads on (for device: auto / devices, the planner's choice)
    devices: list[str] = field(default_factory=list)  # every device it loads on (several: gpus > 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Loaded(Event):
    """``memory`` as measured, ``estimate`` what admission planned with (bytes per device);
    :attr:`estimate_error` compares them."""

    provider: str
    duration_s: float
    memory: dict[str, int] = field(default_factory=dict)
    estimate: dict[str, int] = field(default_factory=dict)

    @property
    def estimate_error(self) -> float | None:
        """estimate ÷ measured over all devices (None when either is unknown)."""
        measured, estimated = sum(self.memory.values()), sum(self.estimate.values())
        return estimated / measured if measured and estimated else None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadFailed(Event):
    provider: str
    error: str
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadAbandoned(Event):
    """Nobody waits for a load any more (every caller left; no ``load()`` or lease over
    HTTP asked for it): ``stage`` ``admission`` — dropped before the runtime was asked —
    or ``loading`` — the runtime's load was stopped (cancelled, then discarded)."""

    provider: str
    stage: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OutOfMemoryRetry(Event):
    """A load ran out of memory on ``device``: its estimate is raised from ``estimate`` to
    ``raised`` (bytes per device) and it is admitted (evicting as the planner chooses) and
    loaded once more; ``free`` what was free on ``device`` (bytes), when known."""

    provider: str
    device: str
    error: str
    estimate: dict[str, int] = field(default_factory=dict)
    raised: dict[str, int] = field(default_factory=dict)
    free: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HookRan(Event):
    """A lifecycle hook (``hook``: before_load, after_load, before_unload, after_unload)
    finished; ``command`` as configured, or the callable's name."""

    hook: str
    command: str
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HookFailed(Event):
    """A lifecycle hook failed, exited non-zero or ran past ``hook_timeout`` (and was
    killed); what it was around went ahead all the same."""

    hook: str
    command: str
    error: str
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BaselineWaiting(Event):
    """The baseline model is out and not brought back yet: ``reason`` (it would evict,
    something else loads or waits, its load failed).  Sent when the reason changes."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Prefetched(Event):
    """A prefetch guess was acted on: ``model`` was likely (``probability``, 0–1) to be
    asked for after ``after``; ``outcome`` is ``"loaded"``, or why not (``"gave way: ..."``,
    ``"stale: ..."``, ``"failed: ..."``).  One per guess, in the order they were made."""

    after: str
    probability: float
    outcome: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Unloading(Event):
    reason: str
    forced: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Unloaded(Event):
    reason: str
    duration_s: float
    freed: dict[str, int] = field(default_factory=dict)
    forced: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Evicted(Event):
    """Chosen by the planner to make room for ``for_model``; an Unloaded follows."""

    for_model: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Slept(Event):
    """Parked in the warm tier (vLLM sleep, torch offload) instead of unloaded."""

    reason: str
    duration_s: float
    memory: dict[str, int] = field(default_factory=dict)  # what it still holds


@dataclass(frozen=True, slots=True, kw_only=True)
class Woke(Event):
    duration_s: float
    memory: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Adopted(Event):
    """Found resident in a runtime at start-up or reconciliation."""

    provider: str
    memory: dict[str, int] = field(default_factory=dict)
    owned: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Vanished(Event):
    """The runtime no longer has a model the manager believed resident."""

    provider: str
    leased: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem(Event):
    """Background work (reconcile, reaper, keep-alive refresh) failed; it carries on and
    retries.  ``model`` is empty unless one model's work failed."""

    component: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryPressure(Event):
    """The watchdog acted on ``device`` because of what it read there: ``used``, ``total``
    and ``free`` as read (bytes, every process), against the ``budget`` and its red and
    hard lines (bytes); for host RAM (``cpu``) ``floor`` is the free RAM it keeps.

    ``level`` is ``"red"`` (past the red line: idle models are evicted until ``used`` is
    back under the budget), ``"hard"`` (past the hard line) or ``"ram"`` (host RAM free
    under the floor).  ``action`` is what was done: ``"evict"`` (``model`` unloaded, idle),
    ``"force"`` (``model`` force-unloaded though leased), ``"alarm"`` (past the hard line
    or under the floor; nothing forced) or ``"stuck"`` (still over, nothing idle left to
    evict; ``model`` empty)."""

    device: str
    level: str
    action: str
    used: int
    total: int
    free: int
    budget: int = 0
    red_line: int = 0
    hard_line: int = 0
    floor: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseAcquired(Event):
    leases: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseReleased(Event):
    leases: int


class Subscriber(Protocol):
    def __call__(self, event: Event, /) -> None: ...


class EventBus:
    """Synchronous fan-out.  Lease events are the hot path's: they are built only when a
    subscriber wants them (``subscribe(fn, leases=False)`` opts out), so a manager whose
    subscribers ignore them pays nothing for them."""

    __slots__ = ("_quiet", "_subscribers")

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._quiet: list[Subscriber] = []  # subscribers that skip lease events

    def subscribe(self, subscriber: Subscriber, *, leases: bool = True) -> Callable[[], None]:
        """Deliver every event to ``subscriber``; ``leases=False``: all but LeaseAcquired /
        LeaseReleased.  Returns the function that unsubscribes it."""
        self._subscribers.append(subscriber)
        if not leases:
            self._quiet.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)
            if subscriber in self._quiet:
                self._quiet.remove(subscriber)

        return unsubscribe

    @property
    def wants_leases(self) -> bool:
        """Whether anyone listens to lease events (the hot path skips building them)."""
        return len(self._subscribers) > len(self._quiet)

    def emit(self, event: Event) -> None:
        quiet = isinstance(event, _QUIET)
        for subscriber in self._subscribers:
            if quiet and subscriber in self._quiet:
                continue
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", subscriber, event.kind)

    def __len__(self) -> int:
        return len(self._subscribers)


_QUIET = (LeaseAcquired, LeaseReleased)


class LoggingSubscriber:
    """Logs transitions at INFO when verbose, else DEBUG; leases always at DEBUG."""

    def __init__(self, logger: logging.Logger = log, *, verbose: bool = False):
        self.logger = logger
        self.level = logging.INFO if verbose else logging.DEBUG

    def __call__(self, event: Event) -> None:
        level = logging.DEBUG if isinstance(event, _QUIET) else self.level
        if isinstance(event, LoadFailed | Problem | HookFailed):
            level = logging.WARNING
        if isinstance(event, MemoryPressure):  # loud: memory past what admission was told
            level = logging.ERROR if event.action in ("alarm", "force", "stuck") else logging.WARNING
        if self.logger.isEnabledFor(level):
            # the event rides along, so a handler or filter can tell what it is about
            self.logger.log(level, "%s", describe(event), extra={"modelmora_event": event})


def describe(event: Event) -> str:
    """A one-line human description, shared by logs and the CLI."""
    from .spec import format_memory

    def mem(m: dict[str, int]) -> str:
        return format_memory(m, "no memory measured")

    match event:
        case Loading():
            if event.note:
                return f"loading {event.model} on {event.provider}: {event.note}"
            return f"loading {event.model} on {event.provider} (estimate: {mem(event.estimate)})"
        case Loaded():
            return f"loaded {event.model} in {event.duration_s:.2f}s ({mem(event.memory)})"
        case LoadFailed():
            return f"failed to load {event.model}: {event.error}"
        case LoadAbandoned():
            if event.stage == "loading":
                return f"stopped loading {event.model}: nobody waits for it any more"
            return f"dropped the load of {event.model} before it started: nobody waits for it any more"
        case OutOfMemoryRetry():
            return (
                f"{event.model} ran out of memory on {event.device}; retrying once with its estimate "
                f"raised from {mem(event.estimate)} to {mem(event.raised)}"
            )
        case Unloading():
            return f"unloading {event.model} ({event.reason}{', forced' if event.forced else ''})"
        case Unloaded():
            return f"unloaded {event.model} in {event.duration_s:.2f}s, freed {mem(event.freed)}"
        case Evicted():
            return f"evicting {event.model} to make room for {event.for_model} ({event.reason})"
        case Slept():
            return f"parked {event.model} in its warm tier ({event.reason}); still holds {mem(event.memory)}"
        case Woke():
            return f"woke {event.model} in {event.duration_s:.2f}s ({mem(event.memory)})"
        case Adopted():
            return f"adopted {event.model} from {event.provider} ({mem(event.memory)})"
        case Vanished():
            return f"{event.model} is no longer resident in {event.provider}"
        case Problem():
            return f"{event.component} failed: {event.error}"
        case MemoryPressure():
            about = f" ({event.model})" if event.model else ""
            return f"memory watchdog on {event.device}{about}: {event.reason}"
        case HookRan():
            return f"{event.hook} hook of {event.model} ran in {event.duration_s:.2f}s ({event.command})"
        case HookFailed():
            return f"{event.hook} hook of {event.model} failed ({event.command}): {event.error}"
        case BaselineWaiting():
            return f"baseline {event.model} not brought back: {event.reason}"
        case Prefetched():
            return (
                f"prefetch of {event.model} (asked for after {event.after} "
                f"{event.probability:.0%} of the time): {event.outcome}"
            )
        case Waiting():
            return f"{event.model} waits for memory held by {', '.join(event.blockers) or '?'}"
        case LeaseAcquired() | LeaseReleased():
            return f"{event.kind} {event.model} (leases: {event.leases})"
    return f"{event.kind} {event.model}"


__all__ = [
    "Adopted",
    "BaselineWaiting",
    "Event",
    "EventBus",
    "Evicted",
    "HookFailed",
    "HookRan",
    "LeaseAcquired",
    "LeaseReleased",
    "LoadAbandoned",
    "LoadFailed",
    "Loaded",
    "Loading",
    "LoggingSubscriber",
    "MemoryPressure",
    "OutOfMemoryRetry",
    "Prefetched",
    "Problem",
    "Slept",
    "Subscriber",
    "Unloaded",
    "Unloading",
    "Vanished",
    "Waiting",
    "Woke",
    "describe",
]
