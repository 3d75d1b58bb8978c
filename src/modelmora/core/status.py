"""What ``ModelManager.status()`` and ``unload_all()`` report: frozen values with ``to_dict``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..memory import MemorySnapshot
from ..spec import AUTO
from .context import Core
from .lifecycle import Entry


@dataclass(frozen=True)
class ModelStatus:
    name: str
    provider: str
    target: str
    state: str
    leases: int
    pinned: bool
    owned: bool
    group: str | None
    memory: dict[str, int]  # bytes per device it is counted for now
    idle_s: float
    expires_in_s: float | None
    loaded_for_s: float | None
    total_leases: int
    estimate: dict[str, int] = field(default_factory=dict)  # bytes per device admission planned with
    estimate_error: float | None = None  # estimate ÷ measured, once a load measured it
    # who lets it go at ``expires_in_s``: "runtime" (its own expiry, Ollama's keep-alive, for a
    # model this manager does not own), "manager" (the reaper: idle for its keep-alive, which
    # only a running manager enforces), None (nothing: expires_in_s is None)
    expires_by: str | None = None
    runtime_expires_in_s: float | None = None  # the runtime's own expiry, where it reports one
    # of ``leases``, the callers waiting for it (to load, wake, or at its gate) rather than holding it
    waiting: int = 0
    # where it runs (``cuda:1``; a multi-GPU model's set; empty while ``device: auto`` has not
    # been placed yet), and why there: the planner's reason, or a runtime's own report of
    # where it put it (Ollama places its runners itself)
    devices: list[str] = field(default_factory=list)
    placement: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ManagerStatus:
    models: list[ModelStatus]
    memory: MemorySnapshot
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # background component → last error

    @property
    def degraded(self) -> bool:
        return bool(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": [m.to_dict() for m in self.models],
            "gpu_observed": self.memory.gpu_observed,
            "devices": {
                d: {
                    "budget": s.budget,
                    "used_by_modelmora": s.modelmora,
                    "peak_by_modelmora": s.peak,
                    "observed": None
                    if s.observed is None
                    else {
                        "total": s.observed.total,
                        "used": s.observed.used,
                        "free": s.observed.free,
                        "source": s.observed.source,
                    },
                }
                for d, s in self.memory.devices.items()
            },
            "failures": self.failures,
            "problems": self.problems,
        }


@dataclass(frozen=True)
class UnloadAllResult:
    unloaded: list[str]
    in_use: list[str]
    pinned: list[str]
    failed: dict[str, str] = field(default_factory=dict)  # name → why its unload failed


def model_status(core: Core, e: Entry, now: float) -> ModelStatus:
    runtime = None if e.runtime_expires_at is None else max(0.0, e.runtime_expires_at - time.time())
    expires, by = e.expires_in(now, core.config.idle_ttl), "manager"
    if not e.owned and runtime is not None:  # the manager never lets it go: the runtime will
        expires, by = runtime, "runtime"
    return ModelStatus(
        name=e.name,
        provider=e.provider,
        target=e.spec.target,
        state=e.state.value,
        leases=e.leases,
        pinned=e.pinned,
        owned=e.owned,
        group=e.spec.group,
        memory=e.held().as_dict(),
        idle_s=e.idle_for(now),
        expires_in_s=expires,
        loaded_for_s=None if e.loaded_at is None else now - e.loaded_at,
        total_leases=e.total_leases,
        estimate=e.estimate.as_dict(),
        estimate_error=_error(e),
        expires_by=None if expires is None else by,
        runtime_expires_in_s=runtime,
        waiting=e.waiters,
        **_placement(e),
    )


def _placement(e: Entry) -> dict[str, Any]:
    """``devices`` and ``placement`` of :class:`ModelStatus`: a runtime's report of where it
    put the model (:attr:`Handle.placement`) when there is one, else the spec's devices and
    the planner's reason."""
    handle = e.handle
    if handle is not None and handle.placement:
        landed = sorted(d for d, n in handle.memory.items() if n > 0 and d != "cpu")
        return {"devices": landed or ["cpu"], "placement": handle.placement}
    devices = [d for d in e.spec.runs_on if d != AUTO]
    return {"devices": devices, "placement": e.placement}


def _error(e: Entry) -> float | None:
    measured = sum(e.measured.as_dict().values()) if e.measured is not None else 0
    estimated = sum(e.estimate.as_dict().values())
    return estimated / measured if measured and estimated else None


def manager_status(core: Core) -> ManagerStatus:
    now = core.clock()
    failures = {
        name: {"failures": f.count, "error": str(f.error), "retry_in_s": max(0.0, f.until - now)}
        for name, f in core.failures.items()
    }
    return ManagerStatus(
        [model_status(core, e, now) for e in core.table],
        core.monitor.snapshot(core.budgets, core.usage(), core.readings),
        failures,
        dict(core.problems),
    )


__all__ = ["ManagerStatus", "ModelStatus", "UnloadAllResult", "manager_status"]
