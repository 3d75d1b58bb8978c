"""Models the manager brings in by itself: the ``on_startup`` preload and the baseline.

* ``on_startup``: loaded one after another once the manager runs, in the background (a
  caller asking for one meanwhile shares its load); a failure is logged, never fatal.
* ``baseline``: a model to have resident whenever nothing else needs the memory — back
  once the memory a larger model took is free again.  Its load is a *background* load
  (:attr:`Entry.background`): admission lets it go ahead only into free memory, with no
  other row loading, waking or waited for, and otherwise it gives way
  (:class:`~modelmora.errors.LoadDeferred`) — decided while holding the admission's turn,
  so it never evicts or parks anything and never goes ahead of a waiting caller.  It is
  looked at again at every change of the table (and every ``reaper_interval``); why it is
  not back yet is sent as :class:`~modelmora.events.BaselineWaiting` when that changes.
  It stays until evicted (no idle expiry: it would only come straight back); a manual
  unload of it holds it back until another model is unloaded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from .. import events as ev
from ..errors import LoadDeferred, ModelMoraError
from ..spec import format_memory
from .admission import Admission
from .context import Core
from .leases import Leases
from .planner import Admit

log = logging.getLogger("modelmora")


async def preload(leases: Leases, names: Sequence[str]) -> None:
    """Load ``names`` in order; a failure is logged as a warning and the rest go on."""
    for name in names:
        try:
            entry, _ = await leases.acquire(name)
        except ModelMoraError as exc:
            log.warning("on_startup: could not preload %s: %s", name, exc)
            continue
        leases.release(entry)


class Baseline:
    def __init__(self, core: Core, leases: Leases, admission: Admission, name: str):
        self.core = core
        self.leases = leases
        self.admission = admission
        self.name = name
        self.held_back = False  # unloaded by hand: not brought back until another model goes
        self._said: str | None = None

    def on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.Unloaded):
            if event.model == self.name:
                self.held_back = event.reason in ("manual", "forced")
            else:
                self.held_back = False

    async def run(self) -> None:
        """The service: runs until the manager's task group ends."""
        core = self.core
        while True:
            if core.table.get(self.name) is None:
                reason = self.why_not()
                if reason is None:
                    reason = await self._bring_back()
                if reason is not None and reason != self._said:
                    core.bus.emit(ev.BaselineWaiting(model=self.name, reason=reason))
                self._said = reason
            else:
                self._said = None
            await core.changed(core.config.reaper_interval)

    def why_not(self) -> str | None:
        """Why the baseline cannot come back now, or None (a check on the last reading; the
        admission decides again on a fresh one)."""
        core = self.core
        if self.held_back:
            return "unloaded by hand (it comes back once another model is unloaded)"
        failure = core.failures.get(self.name)
        if failure is not None and failure.until > core.clock():
            return f"its last load failed ({failure.error}); tried again after the cool-down"
        busy = core.table.busy()
        if busy is not None:
            return busy
        entry = core.new_entry(core.spec(self.name))
        plan = self.admission.decide(entry)
        if not isinstance(plan, Admit):
            return plan.reason
        if plan.evict or plan.sleep:
            return f"would evict {', '.join((*plan.evict, *plan.sleep))}"
        return None

    async def _bring_back(self) -> str | None:
        try:
            entry, _ = await self.leases.acquire(self.name, keep_alive=math.inf, background=True)
        except LoadDeferred as exc:
            return str(exc)
        except ModelMoraError as exc:
            return f"its load failed: {exc}"
        self.leases.release(entry)
        log.info("baseline %s is back (%s)", self.name, format_memory(entry.active.as_dict()))
        return None


__all__ = ["Baseline", "preload"]
