"""The proxy's in-flight requests: what ``GET /requests`` lists and ``POST
/requests/{id}/cancel`` cancels, the queue position a waiting client is told, and the one
helper that ends a wait when its client leaves.

A request is *queued* while its model is not ready and its load has not started,
*loading* while the load it waits for runs, *forwarded* once the runtime has it.  Its
position is 1 + the requests for the same model that arrived before it and still wait.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, TypeVar

import anyio

T = TypeVar("T")

Phase = Literal["waiting", "forwarded"]


@dataclasses.dataclass(eq=False)
class InFlight:
    """One proxied request.  ``started``: ``time.monotonic()`` seconds when it arrived;
    ``waited``: seconds it waited for its model (None while it still waits)."""

    id: str
    model: str
    stream: bool
    started: float
    key: str | None = None  # the API key's name, where the server has several
    lease: str | None = None  # the HTTP lease it was tied to (X-Modelmora-Lease)
    phase: Phase = "waiting"
    waited: float | None = None
    cancelled: anyio.Event = dataclasses.field(default_factory=anyio.Event)


class Requests:
    """The registry of in-flight requests, in arrival order."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._all: dict[str, InFlight] = {}
        self._ids = itertools.count(1)

    def add(self, model: str, *, stream: bool, key: str | None = None, lease: str | None = None) -> InFlight:
        request = InFlight(f"req-{next(self._ids)}", model, stream, self.clock(), key=key, lease=lease)
        self._all[request.id] = request
        return request

    def done(self, request: InFlight) -> None:
        self._all.pop(request.id, None)

    def forwarded(self, request: InFlight) -> None:
        request.phase = "forwarded"
        request.waited = self.clock() - request.started

    def __iter__(self) -> Iterator[InFlight]:
        return iter(list(self._all.values()))

    def __len__(self) -> int:
        return len(self._all)

    def get(self, request_id: str) -> InFlight | None:
        return self._all.get(request_id)

    def waiting(self, model: str) -> list[InFlight]:
        """The requests still waiting for ``model``, first come first."""
        return [r for r in self._all.values() if r.model == model and r.phase == "waiting"]

    def position(self, request: InFlight) -> int | None:
        """1 for the first request waiting for its model; None once forwarded."""
        if request.phase != "waiting":
            return None
        return 1 + sum(1 for r in self.waiting(request.model) if r.started < request.started)

    def cancel(self, request_id: str) -> InFlight | None:
        """Cancel a request: a waiting one leaves the queue (its client gets 499), a
        forwarded one has its answer cut (the runtime's connection is closed).  None when
        no such request is in flight."""
        request = self._all.get(request_id)
        if request is not None:
            request.cancelled.set()
        return request

    def describe(self, request: InFlight, state: str) -> dict[str, Any]:
        """One request as ``GET /requests`` lists it (seconds throughout)."""
        now = self.clock()
        return {
            "id": request.id, "model": request.model, "key": request.key, "lease": request.lease,
            "stream": request.stream, "state": state,
            "waited_s": round(request.waited if request.waited is not None else now - request.started, 3),
            "position": self.position(request),
        }  # fmt: skip


async def unless(wait: Callable[[], Awaitable[T]], *stops: Callable[[], Awaitable[Any]]) -> tuple[T] | None:
    """Run ``wait`` until it returns — ``(its result,)`` — or until one of ``stops``
    returns first: ``wait`` is cancelled and the answer is None.  A ``wait`` that was
    cancelled took nothing (the core's leases guarantee it), so nothing is left to undo.
    An exception of ``wait`` is raised as it is."""
    result: list[T] = []
    error: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def stop(until: Callable[[], Awaitable[Any]]) -> None:
            await until()
            tg.cancel_scope.cancel()

        for until in stops:
            tg.start_soon(stop, until)
        try:
            result.append(await wait())
        except Exception as exc:  # raised as it is, not inside the task group's ExceptionGroup
            error.append(exc)
        tg.cancel_scope.cancel()
    if error:
        raise error[0]
    return (result[0],) if result else None


def disconnected(receive: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
    """Returns when the client has gone (``http.disconnect``), reading ``receive`` after the
    request's body was read whole."""

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return wait


__all__ = ["InFlight", "Requests", "disconnected", "unless"]
