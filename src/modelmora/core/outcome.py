"""The outcome of one load, wake or adoption attempt: one value, set exactly once.

Every caller waiting for a model waits on its row's current :class:`Attempt` and reads the
result from it and nothing else — not the row's state, not whether the row is still in
the table.  The attempt is settled in the same step (no ``await`` in between) in which the
row becomes ready, goes back to its warm tier, or leaves the table, and a failure is
recorded for the cool-down in that same step (:mod:`modelmora.core.loading`), so no caller
can observe a row that has failed but whose failure is not yet known.

The three results, as :class:`Result`:

* ``READY`` — the model is ready: take the lease (if it is still the ready row when the
  caller runs: a forced unload or a runtime death may come first, then start over);
* ``FAILED`` — raise :attr:`Attempt.error`, the same error for every waiter;
* ``AGAIN`` — nothing failed that concerns the caller (an adoption that did not work out,
  a wake whose model left the table, a model adopted asleep): look at the table afresh.
"""

from __future__ import annotations

import enum

import anyio


class Result(enum.Enum):
    READY = "ready"
    FAILED = "failed"
    AGAIN = "again"


class Attempt:
    """A future-like outcome: :meth:`wait` until one of :meth:`ready`, :meth:`failed` or
    :meth:`again` is called; later calls are ignored (the first settles it)."""

    __slots__ = ("_done", "adoption", "error", "result")

    def __init__(self, *, adoption: bool = False, settled: bool = False) -> None:
        self._done = anyio.Event()
        self.adoption = adoption  # reconcile's adoption, not a caller's load
        self.result: Result | None = None
        self.error: BaseException | None = None
        if settled:
            self.result = Result.AGAIN
            self._done.set()

    @property
    def done(self) -> bool:
        return self.result is not None

    def ready(self) -> None:
        self._settle(Result.READY, None)

    def failed(self, error: BaseException) -> None:
        self._settle(Result.FAILED, error)

    def again(self) -> None:
        self._settle(Result.AGAIN, None)

    def _settle(self, result: Result, error: BaseException | None) -> None:
        if self.result is not None:
            return
        self.result, self.error = result, error
        self._done.set()

    async def wait(self) -> Result:
        await self._done.wait()
        assert self.result is not None
        return self.result

    def __repr__(self) -> str:
        what = "pending" if self.result is None else self.result.value
        return f"<Attempt {what}{' (adoption)' if self.adoption else ''}>"


__all__ = ["Attempt", "Result"]
