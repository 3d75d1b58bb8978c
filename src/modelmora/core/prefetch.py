"""Prefetch learned from live traffic: load the likely next model before it is asked for.

After every request (:meth:`Core.requested`) the learner (:class:`policy.Successors`)
has counted which model followed which; :meth:`Prefetch.on_request` asks it for the
likeliest model after this one.  When that one was at least ``min_probability`` of the
last followers, with at least ``min_observations`` counted, and it is not resident (nor
loading), it is loaded as a *background* load (``load(background=True)``, as the
``baseline`` model is): admission lets it in only into free memory, with no other row
loading, waking or waited for, and otherwise it gives way
(:class:`~modelmora.errors.LoadDeferred`).  A wrong guess so costs idle memory, never a
leased model, and never a caller's place in line; while it loads, a caller that needs
its memory waits for it as for any load (the price of a guess, bounded by one load).

Guesses are acted on one at a time, in the order they were made; each ends in one
:class:`~modelmora.events.Prefetched` event saying how.  One that waits (another load
under way) is tried again at every change of the table until it gets in, is no longer
the latest guess (``stale``), or would evict (``gave way``).
"""

from __future__ import annotations

import logging
from collections import deque

import anyio

from .. import events as ev
from ..config import PrefetchConfig
from ..errors import LoadDeferred, ModelMoraError
from .context import Core
from .leases import Leases

log = logging.getLogger("modelmora")


class Prefetch:
    """The prefetch service (one per manager, with ``prefetch.enabled``)."""

    def __init__(self, core: Core, leases: Leases, settings: PrefetchConfig):
        self.core = core
        self.leases = leases
        self.settings = settings
        self.requests = 0  # requests seen: a guess made before the latest one is stale
        self._guesses: deque[tuple[str, str, float, int]] = deque()  # model, after, p, request
        self._wake = anyio.Event()

    def on_request(self, name: str) -> None:
        """A request for ``name`` was granted (called by the core, never awaits): queue the
        likely next model when it clears both thresholds and is not in the table."""
        self.requests += 1
        guess = self.core.successors.likely(
            name, self.settings.min_probability, self.settings.min_observations
        )
        if guess is None or guess[0] == name or self.core.table.get(guess[0]) is not None:
            return
        self._guesses.append((guess[0], name, guess[1], self.requests))
        self._wake.set()

    async def run(self) -> None:
        """The service: runs until the manager's task group ends."""
        while True:
            if not self._guesses:
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            model, after, p, made = self._guesses.popleft()
            outcome = await self._try(model, made)
            log.debug("prefetch of %s after %s (p=%.2f): %s", model, after, p, outcome)
            self.core.bus.emit(ev.Prefetched(model=model, after=after, probability=p, outcome=outcome))

    async def _try(self, model: str, made: int) -> str:
        core = self.core
        while True:
            if made != self.requests:
                return "stale: another request came since"
            if core.table.get(model) is not None:
                return "already resident or loading"
            try:
                entry, _ = await self.leases.acquire(model, background=True)
            except LoadDeferred as exc:
                if core.table.busy() is None:  # it would evict or wait for leased memory
                    return "gave way: " + str(exc).split("gave way: ", 1)[-1]
            except ModelMoraError as exc:
                return f"failed: {exc}"
            else:
                self.leases.release(entry)
                return "loaded"
            await core.changed(core.config.reaper_interval)  # another load or a waiter: after it


__all__ = ["Prefetch"]
