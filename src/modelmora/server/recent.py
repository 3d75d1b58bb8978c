"""The recent proxied requests, kept on the server in a bounded ring so that the status page
shows them when it is opened (or reloaded) after they were answered.

One :class:`RequestRecord` per proxied request once its answer has gone out (or failed),
written by :class:`~modelmora.server.hot_path.HotPath` for both of the proxy's paths.  The
ring holds the last ``size`` records (oldest dropped first), so its memory is bounded
whatever the traffic; listeners (the open ``/events`` streams that asked for requests) get
each new record as it is added.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

RECENT_REQUESTS = 100


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One proxied request: ``at`` unix seconds when it ended, ``route`` its path
    (``/v1/chat/completions``), ``status`` the HTTP status sent (0: none, the client left
    first), ``duration_s`` seconds from its first byte in to its last byte out,
    ``waited_s`` seconds it waited for the model's load (None: the model was ready)."""

    at: float
    method: str
    route: str
    model: str
    status: int
    duration_s: float
    waited_s: float | None = None

    def describe(self) -> str:
        """One line, as the request log writes it."""
        line = f"{self.method} {self.route} {self.model} {self.status or '-'} {self.duration_s:.3f}s"
        return line if self.waited_s is None else f"{line} (waited {self.waited_s:.2f}s for its load)"

    def to_dict(self) -> dict[str, Any]:
        """The record as ``/events`` sends it (``kind`` ``Request``, ``text`` :meth:`describe`)."""
        return {
            "kind": "Request", "at": self.at, "method": self.method, "route": self.route,
            "model": self.model, "status": self.status, "duration_s": self.duration_s,
            "waited_s": self.waited_s, "text": self.describe(),
        }  # fmt: skip


Listener = Callable[[RequestRecord], None]


class RecentRequests:
    """A ring of the last ``size`` :class:`RequestRecord` (oldest first) and the listeners
    told of each new one.  Used from the event loop's thread only; a listener that raises
    is dropped, never the request."""

    def __init__(self, size: int = RECENT_REQUESTS):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self._ring: collections.deque[RequestRecord] = collections.deque(maxlen=size)
        self._listeners: list[Listener] = []

    def add(self, record: RequestRecord) -> None:
        self._ring.append(record)
        for listener in list(self._listeners):
            try:
                listener(record)
            except Exception:
                self._remove(listener)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with each new record; returns the function that stops it."""
        self._listeners.append(listener)
        return lambda: self._remove(listener)

    def _remove(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(list(self._ring))

    def __len__(self) -> int:
        return len(self._ring)


__all__ = ["RECENT_REQUESTS", "RecentRequests", "RequestRecord"]
