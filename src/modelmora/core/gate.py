"""A model whose memory an admission waits for: its new leases are limited.

While an admission waits for memory that busy models hold, each of them may grant at most
``scheduling.max_batch_before_swap`` more leases, and none once the admission's first
request has waited ``scheduling.max_wait`` seconds (:mod:`modelmora.core.scheduling`
decides); callers after that queue at its :class:`Gate` until no admission waits for it
any more (:mod:`modelmora.core.admission`), so steady traffic on a resident model cannot
starve a model queued for its memory.

Callers queued at a gate count as the model's leases (``Entry.waiters``) for every unload,
park, reap and eviction decision — except the decisions of the admissions they queue
behind (:attr:`Gate.admissions`): those are what the callers yield to.
"""

from __future__ import annotations

import anyio


class Gate:
    __slots__ = ("admissions", "bypass_left", "opened", "queued", "since")

    def __init__(self, bypass: int, since: float) -> None:
        self.admissions: set[str] = set()  # names of the admissions waiting for this model
        self.bypass_left = bypass  # leases still granted past the waiting admissions
        self.since = since  # clock seconds since when the admissions' first request waits
        self.opened = anyio.Event()  # set once no admission waits for it any more
        self.queued = 0  # callers waiting at this gate (counted in Entry.waiters too)

    def may_pass(self) -> bool:
        """Whether the batch bound lets one more lease through now (and count it)."""
        if self.bypass_left > 0:
            self.bypass_left -= 1
            return True
        return False


__all__ = ["Gate"]
