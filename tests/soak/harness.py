"""A randomized workload with fault injection, and the invariants checked after every step.

Runtimes plug in through :class:`Faults`: each knows how to misbehave (fail or hang a
load, refuse connections for a while, evict behind the manager's back, kill a model while
leased, slow down unloads) and how to report what it really holds.  The short run is part
of CI; ``MODELMORA_SOAK_OPS`` makes a long one (see the README's reliability section).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from modelmora import HandleClosed, ModelManager, ModelMoraError
from modelmora import events as ev

GB = 10**9


def soak_ops(default: int) -> int:
    return int(os.environ.get("MODELMORA_SOAK_OPS", default))


@dataclass
class Faults:
    """What a runtime can do wrong, and what it truly holds (bytes per device)."""

    fail_next: Callable[[str], None]
    hang_next: Callable[[str], None] | None  # None: the runtime cannot be made to hang a load
    unhang: Callable[[str], None]
    evict: Callable[[str], None]
    set_reachable: Callable[[bool], None] | None  # None: the runtime has no server to take down
    held: Callable[[], dict[str, int]]
    orphans: Callable[[], list[str]] = lambda: []


@dataclass
class SoakResult:
    ops: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "operations": self.ops,
            "faults_injected": sum(self.faults.values()),
            "faults": dict(self.faults),
            "outcomes": dict(self.outcomes),
            "invariant_violations": len(self.violations),
        }


class Soak:
    def __init__(
        self, mm: ModelManager, faults: Faults, models: list[str], budgets: dict[str, int], *, seed: int
    ):
        self.mm = mm
        self.faults = faults
        self.models = models
        self.budgets = budgets
        self.rng = random.Random(seed)
        self.result = SoakResult()
        self.reachable = True  # the runtime, as the faults last set it
        self.back_at = 0  # the operation at which an unreachable runtime comes back
        mm.events.subscribe(self._on_event)

    def _on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.Unloading) and not e.forced:
            entry = next((x for x in self.mm.entries() if x.name == e.model), None)
            # callers queued at its gate behind an admission yield to that admission's
            # evictions (issue 22); every other lease, a waiting caller's too, protects it
            yielding = entry.queued if entry is not None and e.reason.startswith("evicted") else 0
            if entry is not None and entry.leases - yielding:
                self.result.violations.append(
                    f"{e.model} unloaded with {entry.leases} lease(s) without force"
                )

    def check(self) -> None:
        believed = self.mm.usage()
        held = self.faults.held()
        for device, budget in self.budgets.items():
            if believed.get(device, 0) > budget:
                self.result.violations.append(
                    f"manager believes {believed.get(device)} > {budget} on {device}"
                )
            if held.get(device, 0) > budget:
                self.result.violations.append(f"runtime holds {held.get(device)} > {budget} on {device}")
        for entry in self.mm.entries():
            if entry.leases < 0:
                self.result.violations.append(f"{entry.name} has {entry.leases} leases")

    async def user(self, name: str, hold: int, timeout: float | None) -> None:
        try:
            with anyio.fail_after(30):  # liveness: every waiter gets a model or an error
                async with self.mm.use(name, timeout=timeout) as handle:
                    for _ in range(hold):
                        await anyio.lowlevel.checkpoint()
                    try:
                        handle.check_open()
                    except HandleClosed:
                        self.result.outcomes["handle closed under a holder"] += 1
                self.result.outcomes["lease ok"] += 1
        except ModelMoraError as exc:  # before TimeoutError: ModelMoraTimeout is a clear error
            self.result.outcomes[type(exc).__name__] += 1
        except TimeoutError:
            self.result.violations.append(f"a waiter for {name} got neither a model nor an error in 30s")

    async def run(self, ops: int) -> SoakResult:
        rng, mm, faults = self.rng, self.mm, self.faults
        async with anyio.create_task_group() as tg:
            for _ in range(ops):
                self.result.ops += 1
                if not self.reachable and self.result.ops >= self.back_at and faults.set_reachable is not None:
                    faults.set_reachable(True)  # an outage lasts operations, not seconds: the
                    self.reachable = True  # same soak whatever the machine's speed
                name = rng.choice(self.models)
                roll = rng.random()
                try:
                    if roll < 0.55:
                        tg.start_soon(self.user, name, rng.randint(0, 30), rng.choice([None, 0.05, 0.5]))
                    elif roll < 0.62:
                        scope = anyio.CancelScope()

                        async def cancelled(name: str = name, scope: anyio.CancelScope = scope) -> None:
                            with scope:
                                await self.user(name, 50, None)

                        tg.start_soon(cancelled)
                        await anyio.lowlevel.checkpoint()
                        scope.cancel()
                        self.result.faults["cancellation"] += 1
                    elif roll < 0.68:
                        await mm.load(name, timeout=0.5)
                    elif roll < 0.76:
                        await mm.unload(name, force=rng.random() < 0.25)
                    elif roll < 0.78:
                        await mm.unload_all(force=rng.random() < 0.3)
                    elif roll < 0.81:
                        faults.fail_next(name)
                        self.result.faults["failing load"] += 1
                    elif roll < 0.82 and faults.hang_next is not None:
                        faults.hang_next(name)
                        self.result.faults["hanging load"] += 1
                        tg.start_soon(self._unhang_later, name)
                    elif roll < 0.86:
                        faults.evict(name)
                        self.result.faults["evicted behind our back"] += 1
                    elif roll < 0.87 and faults.set_reachable is not None:
                        faults.set_reachable(False)
                        self.reachable = False
                        self.back_at = self.result.ops + rng.randint(2, 20)
                        self.result.faults["runtime unreachable"] += 1
                    elif roll < 0.9:
                        reachable = self.reachable
                        await mm.reconcile()
                        if reachable and mm.outages():  # it answered: its outage is over
                            self.result.violations.append(
                                f"a reconcile of a reachable runtime left outages {mm.outages()}"
                            )
                    else:
                        await anyio.sleep(0.001)
                except ModelMoraError as exc:
                    self.result.outcomes[type(exc).__name__] += 1
                await anyio.lowlevel.checkpoint()
                self.check()
        self.check()
        return self.result

    async def _unhang_later(self, name: str) -> None:
        await anyio.sleep(self.rng.uniform(0.01, 0.2))
        self.faults.unhang(name)

