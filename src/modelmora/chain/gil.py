"""Handing the GIL to the event loop's thread from long pure-Python work in a worker thread.

CPython lets a thread that wants the GIL wait for the *switch interval*
(:func:`sys.getswitchinterval`, 5 ms by default) before it asks the holder to drop it
(``Python/ceval_gil.c``, "Notes about the implementation"); a thread that computes in pure
Python therefore delays the event loop's thread by up to one interval every time the loop
wakes up — a task that sleeps 10 ms ticks every ~15 ms, sometimes 20 (measured beside a
busy worker thread in ``benchmarks/bench_chain.py``).  Releasing the GIL on purpose
(``time.sleep(0)``) offers it to a waiting thread at once — best effort: the releasing
thread may win it back, which the switch interval then bounds as before; offering it
every :data:`HANDOVER_S` or so (the callers sit in every inner loop) kept a 10 ms tick
within 11–13 ms beside the planner, for a few microseconds of the worker's time each.
"""

from __future__ import annotations

import time

_clock = time.perf_counter
_release = time.sleep  # time.sleep(0) releases and retakes the GIL

HANDOVER_S = 0.0005
"""Seconds between two offers of the GIL (the least; how much more depends on how often the
callers call :func:`handover`)."""

_last = 0.0


def handover() -> None:
    """Release the GIL for a moment if :data:`HANDOVER_S` has passed since the last time
    (in any thread: a shared instant, so concurrent planners hand over at least as often).
    Call it from the inner loops of CPU-bound work that runs in a worker thread."""
    global _last
    now = _clock()
    if now - _last >= HANDOVER_S:
        _last = now
        _release(0)  # a thread waiting for the GIL can take it now
