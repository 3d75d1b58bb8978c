"""What a waiting client is told: its place in the queue, and how far the load it waits for
has come, with an estimate of the time left.

The estimate is the model's last measured load time (``ModelManager.footprint``: the
duration of this manager's last load of it, else the registry's ``load_time``) less the
time the load under way has run, floored at zero; the percentage is that elapsed time over
the measured one, capped at 99 % until the load has really finished.  A model never
measured and without a ``load_time`` gets no percentage, only the time so far.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from .. import events as ev
from ..core import ModelManager


class LoadClock:
    """When each load under way started (``time.monotonic()`` seconds), from the manager's
    events: ``Loading`` starts one, ``Loaded``, ``LoadFailed`` and ``LoadAbandoned`` end it."""

    def __init__(self, manager: ModelManager, clock: Callable[[], float] = time.monotonic):
        self.manager = manager
        self.clock = clock
        self.started: dict[str, float] = {}
        self.unsubscribe = manager.events.subscribe(self._on_event, leases=False)

    def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.Loading):
            self.started.setdefault(event.model, self.clock())
        elif isinstance(event, ev.Loaded | ev.LoadFailed | ev.LoadAbandoned):
            self.started.pop(event.model, None)

    def estimate(self, model: str) -> dict[str, Any]:
        """``{"loading": bool, "elapsed_s", "expected_s", "eta_s", "percent"}`` (seconds, to
        the millisecond; None where unknown) for the load of ``model`` under way, if any:
        with none under way only ``expected_s`` (what a load takes) is set."""
        started = self.started.get(model)
        expected: float | None = None
        if model in self.manager.config.models:
            seconds = self.manager.footprint(model)[1]
            expected = seconds if seconds is not None and math.isfinite(seconds) and seconds > 0 else None
        if started is None:
            return {
                "loading": False,
                "elapsed_s": None,
                "expected_s": expected,
                "eta_s": None,
                "percent": None,
            }
        elapsed = round(max(0.0, self.clock() - started), 3)
        if expected is None:
            return {"loading": True, "elapsed_s": elapsed, "expected_s": None, "eta_s": None, "percent": None}
        percent = min(99, int(100 * elapsed / expected))
        eta = round(max(0.0, expected - elapsed), 3)
        return {
            "loading": True,
            "elapsed_s": elapsed,
            "expected_s": expected,
            "eta_s": eta,
            "percent": percent,
        }


def progress_line(model: str, position: int | None, estimate: dict[str, Any]) -> str:
    """One SSE comment line (``: …\\n\\n``), which SSE parsers (OpenAI's clients too) skip:
    ``: queued qwen-14b, position 2`` or ``: loading qwen-14b 40 % (about 12 s left)``."""
    if not estimate["loading"]:
        return f": queued {model}, position {position or 1}\n\n"
    if estimate["percent"] is None:
        return f": loading {model} ({estimate['elapsed_s']:.0f} s so far, no load time measured yet)\n\n"
    return f": loading {model} {estimate['percent']} % (about {math.ceil(estimate['eta_s'])} s left)\n\n"


__all__ = ["LoadClock", "progress_line"]
