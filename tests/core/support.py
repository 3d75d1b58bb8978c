"""Helpers for the core's regression tests: a manager over FaultyProvider, background lease
holders sequenced with events, and checks against the runtime's truth."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import anyio.abc

from modelmora import Handle, ModelManager, ModelMoraError
from modelmora import events as ev
from modelmora.memory import MemoryProbe, StaticProbe
from modelmora.testing.faulty import FaultyProvider

GB = 10**9

settle = anyio.wait_all_tasks_blocked
"""Until every other task is blocked: the manager has done all it can without the test."""


def model(gb: float, **spec: Any) -> dict[str, Any]:
    """A registry entry on the faulty runtime: ``gb`` GB on cuda:0."""
    return {"provider": "faulty", "memory": f"{gb}GB", **spec}


def faulty_manager(
    faulty: FaultyProvider,
    models: Mapping[str, Any],
    *,
    probe: MemoryProbe | None = None,
    budgets: Mapping[str, str] | None = None,
    unload_on_exit: bool = False,
    **config: Any,
) -> ModelManager:
    """A manager on ``faulty`` with a 16 GB cuda:0 budget, nothing measured, and no
    background work (reaper, reconcile, watchdog) unless the test asks for it."""
    cfg: dict[str, Any] = {
        "budgets": dict(budgets or {"cuda:0": "16GB"}),
        "reaper_interval": 3600,
        "reconcile_interval": 3600,
        "watchdog": {"interval": 3600},
        **config,
        "models": dict(models),
    }
    return ModelManager(
        cfg, providers={"faulty": faulty}, probe=probe or StaticProbe({}), unload_on_exit=unload_on_exit
    )


class Events:
    """Every event the manager emits, in order."""

    def __init__(self, mm: ModelManager):
        self.all: list[ev.Event] = []
        mm.events.subscribe(self.all.append)

    def of(self, kind: type[ev.Event], model: str | None = None) -> list[Any]:
        return [e for e in self.all if isinstance(e, kind) and (model is None or e.model == model)]


class Holder:
    """A caller in a background task that takes a lease on ``name`` and keeps it until
    :attr:`release` is set.  ``granted`` is set once it holds the model; ``done`` once it
    has finished, with ``error`` the ModelMoraError it got, if any."""

    def __init__(self, mm: ModelManager, name: str, *, timeout: float | None = None):
        self.mm = mm
        self.name = name
        self.timeout = timeout
        self.granted = anyio.Event()
        self.release = anyio.Event()
        self.done = anyio.Event()
        self.handle: Handle | None = None
        self.error: ModelMoraError | None = None
        self.closed_while_held = False

    async def run(self) -> None:
        try:
            async with self.mm.use(self.name, timeout=self.timeout) as handle:
                self.handle = handle
                self.granted.set()
                await self.release.wait()
                self.closed_while_held = handle.closed
        except ModelMoraError as exc:
            self.error = exc
        finally:
            self.done.set()

    def __repr__(self) -> str:
        state = "granted" if self.granted.is_set() else "waiting"
        if self.done.is_set():
            state = f"done ({self.error!r})" if self.error else "done"
        return f"<Holder {self.name} {state}>"


def hold(tg: anyio.abc.TaskGroup, mm: ModelManager, name: str, *, timeout: float | None = None) -> Holder:
    holder = Holder(mm, name, timeout=timeout)
    tg.start_soon(holder.run)
    return holder


async def release_all(*holders: Holder) -> None:
    for holder in holders:
        holder.release.set()
    for holder in holders:
        await holder.done.wait()


def overcommits(faulty: FaultyProvider, budgets: Mapping[str, int]) -> list[str]:
    """Loads and wakes the runtime started while what it holds, what its pending loads and
    wakes will hold, and other processes' memory exceeded a budget."""
    out = []
    for call in faulty.calls:
        if call.op not in ("load", "wake", "sleep"):
            continue
        for device, budget in budgets.items():
            total = call.committed.get(device, 0) + call.external.get(device, 0)
            if total > budget:
                out.append(
                    f"{call.op} of {call.target} started with {total / GB:g} GB committed on {device} "
                    f"against a {budget / GB:g} GB budget (other processes: "
                    f"{call.external.get(device, 0) / GB:g} GB)"
                )
    return out
