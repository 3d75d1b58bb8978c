"""Handing the GIL to the event loop's thread from long pure-Python work in a worker thread.

CPython lets a thread that wants the GIL wait for the *switch interval*
(:func:`sys.getswitchinterval`, 5 ms by default) before it asks the holder to drop it
(``Python/ceval_gil.c``, "Notes about the implementation"); a thread that computes in pure
Python therefore delays the event loop's thread by up to one interval every time the loop
wakes up — a task that sleeps 10 ms ticks every ~15 ms, sometimes 20 (measured beside a
busy worker thread in ``benchmarks/bench_chain.py``).  Releasing the GIL on purpose
(``time.sleep(0)``) hands it to a waiting thread at once; doing that at most every
:data:`HANDOVER_S` keeps the loop's extra latency to about that, for a few microseconds
of the worker's time each.
"""

from __future__ import annotations

import time

HANDOVER_S = 0.0005
"""Most seconds of pure-Python work between two hand-overs."""

_last = 0.0


def handover() -> None:
    """Release the GIL for a moment if :data:`HANDOVER_S` has passed since the last time
    (in any thread: a shared instant, so concurrent planners hand over at least as often).
    Call it from the inner loops of CPU-bound work that runs in a worker thread."""
    global _last
    now = time.perf_counter()
    if now - _last >= HANDOVER_S:
        _last = now
        time.sleep(0)  # releases the GIL; a thread waiting for it takes it now
