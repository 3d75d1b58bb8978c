"""The memory watchdog: memory that grows after a load, or that other processes take.

Admission reasons only about what it was told.  A KV cache or activations growing after
a load, an estimate that was low, or another process allocating on the GPU can push what
a device really holds past its budget.  Every ``watchdog.interval`` the watchdog reads the
devices afresh (:meth:`Core.refresh_readings`):

* on a measured GPU whose reading (``used``, every process) is past the **red line**
  (``budget × (1 + red_line)``) it evicts idle models holding memory there, cheapest to
  lose first, one at a time, re-reading after each, until ``used`` is back under the
  **budget** — not the red line, so that it does not flap;
* past the **hard line** (``budget × (1 + hard_line)``), or with host RAM free under
  ``ram_floor``, it raises the alarm (an ERROR-level event) and, only with ``force``,
  force-unloads leased models, cheapest first, until the reading is back under that line.

"Idle" means settled (ready or parked), no lease, not pinned, and owned (a model adopted
from a runtime that keeps it on its own is left to that runtime, as the reaper does).
Cheapest to lose is the smallest ``bytes on the device × seconds its reload takes`` (its
last load here, else its spec's ``load_time``, else 1 s: placement's eviction cost), least
recently used first among equals.  A leased model is never evicted without ``force``.

Every action is one :class:`~modelmora.events.MemoryPressure` event carrying the reading
that caused it.  A failing step is a problem (``status().problems``), never the loop's end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio
import anyio.abc

from .. import events as ev
from ..errors import UnloadFailed
from ..memory import DeviceMemory
from ..spec import format_size
from .context import Core
from .lifecycle import STABLE, Entry
from .transitions import Transitions

log = logging.getLogger("modelmora")


@dataclass(frozen=True, slots=True)
class Row:
    """What the watchdog needs to know of one model on one device."""

    name: str
    bytes: int  # held on the device
    leases: int = 0
    pinned: bool = False
    settled: bool = True
    owned: bool = True
    cost: float = 0.0  # bytes × reload seconds
    last_used: float = 0.0


def pick(rows: Iterable[Row], *, leased: bool = False) -> Row | None:
    """The cheapest row to lose that holds memory: among idle rows (``leased=False``), or
    among leased ones (``leased=True``, for a forced unload).  Never a pinned, unsettled
    or unowned row, and never a leased one unless ``leased``."""
    pool = [
        r for r in rows if r.bytes > 0 and r.settled and r.owned and not r.pinned and (r.leases > 0) == leased
    ]
    return min(pool, key=lambda r: (r.cost, r.last_used, r.name), default=None)


@dataclass(frozen=True, slots=True)
class Lines:
    """One device's lines, as predicates on a reading."""

    level: str  # "red" for a GPU, "ram" for host RAM
    budget: int
    red_line: int
    hard_line: int
    floor: int
    triggered: Callable[[DeviceMemory], bool]  # start evicting idle models
    settled: Callable[[DeviceMemory], bool]  # stop evicting idle models
    hard: Callable[[DeviceMemory], bool]  # raise the alarm; force while it holds


class Watchdog:
    def __init__(self, core: Core, transitions: Transitions):
        self.core = core
        self.transitions = transitions
        self._alarmed: set[str] = set()  # devices past the hard line (one alarm per episode)
        self._stuck: set[str] = set()  # devices over with nothing idle left (one event per episode)

    async def run(self) -> None:
        """The loop (a service of the manager's task group): a failing step is reported as
        the ``watchdog`` problem and retried at the next interval."""
        core = self.core
        failed = False
        while True:
            await anyio.sleep(core.config.watchdog.interval)
            if not core.running:
                continue
            try:
                await self.step()
            except Exception as exc:
                log.warning("memory watchdog failed: %s", exc)
                core.problem("watchdog", exc)
                failed = True
            else:
                if failed:
                    core.recovered("watchdog")
                    failed = False

    async def step(self) -> None:
        """Read the devices once and act on each device past its lines."""
        core = self.core
        await core.refresh_readings()
        for reading in list(core.readings):
            lines = self.lines(reading)
            if lines is not None:
                await self._watch(reading.device, lines)

    def lines(self, reading: DeviceMemory) -> Lines | None:
        cfg = self.core.config.watchdog
        device = reading.device
        if device.startswith("cuda:") and device in self.core.budgets:
            budget = self.core.budgets[device]
            red, hard = int(budget * (1 + cfg.red_line)), int(budget * (1 + cfg.hard_line))
            return Lines(
                "red", budget, red, hard, 0,
                triggered=lambda r: r.used > red,
                settled=lambda r: r.used <= budget,
                hard=lambda r: r.used > hard,
            )  # fmt: skip
        if device == "cpu" and cfg.ram_floor is not None:
            floor = cfg.ram_floor
            return Lines(
                "ram", self.core.budgets.get(device, 0), 0, 0, floor,
                triggered=lambda r: r.free < floor,
                settled=lambda r: r.free >= floor,
                hard=lambda r: r.free < floor,
            )  # fmt: skip
        return None

    def _reading(self, device: str) -> DeviceMemory | None:
        return next((r for r in self.core.readings if r.device == device), None)

    def _event(self, reading: DeviceMemory, lines: Lines, action: str, reason: str, model: str = "") -> None:
        level = "hard" if action in ("alarm", "force") and lines.level == "red" else lines.level
        self.core.bus.emit(
            ev.MemoryPressure(
                model=model, device=reading.device, level=level, action=action,
                used=reading.used, total=reading.total, free=reading.free,
                budget=lines.budget, red_line=lines.red_line, hard_line=lines.hard_line,
                floor=lines.floor, reason=reason,
            )
        )  # fmt: skip

    def _describe(self, reading: DeviceMemory, lines: Lines) -> str:
        if lines.level == "ram":
            return (
                f"host RAM free {format_size(reading.free)} is under the floor of {format_size(lines.floor)}"
            )
        return (
            f"{format_size(reading.used)} used against a {format_size(lines.budget)} budget "
            f"(red line {format_size(lines.red_line)}, hard line {format_size(lines.hard_line)})"
        )

    async def _watch(self, device: str, lines: Lines) -> None:
        core = self.core
        force = core.config.watchdog.force
        reading = self._reading(device)
        if reading is None:
            return
        if not lines.hard(reading):
            self._alarmed.discard(device)
        if lines.settled(reading):
            self._stuck.discard(device)
        if not lines.triggered(reading):
            return
        if lines.hard(reading) and device not in self._alarmed:
            self._alarmed.add(device)
            then = "forcing leased models out" if force else "not forcing (watchdog.force is off)"
            self._event(
                reading, lines, "alarm", f"past the hard line: {self._describe(reading, lines)}; {then}"
            )
        tried: set[Entry] = set()  # unloads that failed this step are not retried in it
        # idle models, cheapest first, until the reading is under the budget (hysteresis)
        while not lines.settled(reading) and core.running:
            entry = self._next(device, leased=False, skip=tried)
            if entry is None:
                break
            if not await self._unload(entry, reading, lines, force=False):
                tried.add(entry)
            reading = await self._reread(device)
            if reading is None:
                return
        # leased ones only with force, and only while past the hard line
        while force and lines.hard(reading) and core.running:
            entry = self._next(device, leased=True, skip=tried)
            if entry is None:
                break
            if not await self._unload(entry, reading, lines, force=True):
                tried.add(entry)
            reading = await self._reread(device)
            if reading is None:
                return
        if lines.settled(reading):
            self._stuck.discard(device)
        elif device not in self._stuck:
            self._stuck.add(device)
            what = "nothing idle is left to evict" + ("" if force else " (leased models are kept)")
            self._event(reading, lines, "stuck", f"{self._describe(reading, lines)}; {what}")

    async def _reread(self, device: str) -> DeviceMemory | None:
        await self.core.refresh_readings()
        return self._reading(device)

    def _next(self, device: str, *, leased: bool, skip: set[Entry]) -> Entry | None:
        entries = {e.name: e for e in self.core.table if e not in skip}
        row = pick((self.row(e, device) for e in entries.values()), leased=leased)
        return None if row is None else entries[row.name]

    def row(self, entry: Entry, device: str) -> Row:
        held = entry.held().on(device)
        return Row(
            name=entry.name,
            bytes=held,
            leases=entry.leases,
            pinned=entry.pinned,
            settled=entry.state in STABLE,
            owned=entry.owned,
            cost=held * self.core.reload_seconds(entry.name),
            last_used=entry.last_used,
        )

    async def _unload(self, entry: Entry, reading: DeviceMemory, lines: Lines, *, force: bool) -> bool:
        """Unload ``entry`` (its event first, with the reading that caused it); False when
        the runtime refused (reported as a problem)."""
        what = "force-unloading it though leased" if force else "evicting it (idle)"
        held = format_size(entry.held().on(reading.device))
        reason = f"{self._describe(reading, lines)}; {what}, it holds {held} there"
        self._event(reading, lines, "force" if force else "evict", reason, entry.name)
        try:
            await self.transitions.unload(entry, reason=f"memory watchdog: {reason}", force=force)
        except UnloadFailed as exc:
            self.core.problem(f"unload:{entry.name}", exc, entry.name)
            return False
        return True


__all__ = ["Lines", "Row", "Watchdog", "pick"]
