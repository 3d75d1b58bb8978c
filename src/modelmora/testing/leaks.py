"""Processes a test run started and left running, found even after they were re-parented.

A server started with ``start_new_session=True`` whose parent forgot it is re-parented to
PID 1 when the test process exits, so a search of the test process's children misses it.
:func:`mark_session` puts a marker in this process's environment, which every process it
starts inherits (and theirs in turn), and :func:`leftovers` finds the live processes that
carry it, as well as any descendants, however they were started::

    marker = mark_session()
    ...                       # run the tests
    left = leftovers(marker)  # psutil.Process objects, after a grace period
    if left:
        report = describe(left)
        reap(left)
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable

import psutil

MARKER = "LEAK_CHECK_MARKER"  # not MODELMORA_*: the config reads those as overrides


def mark_session() -> str:
    """Mark this process's environment (inherited by whatever it starts); returns the marker."""
    marker = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ[MARKER] = marker
    return marker


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _marked(marker: str, variable: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(variable) == marker:
                found.append(proc)
        except psutil.Error:  # gone, or not ours to read
            continue
    return found


def leftovers(
    marker: str, *, grace: float = 5.0, descendants: bool = True, variable: str = MARKER
) -> list[psutil.Process]:
    """Live processes started from this one (carrying ``marker`` in ``variable``, or still
    its descendants), after giving those that are shutting down ``grace`` seconds to finish.
    This process and its ancestors, which may carry the marker too, are not counted."""
    me = psutil.Process()
    found = [*_marked(marker, variable), *(me.children(recursive=True) if descendants else [])]
    skip = {me.pid, *(p.pid for p in me.parents())}
    candidates = {p.pid: p for p in found if p.pid not in skip}
    _, alive = psutil.wait_procs([p for p in candidates.values() if _alive(p)], timeout=grace)
    return sorted((p for p in alive if _alive(p)), key=lambda p: p.pid)


def describe(procs: Iterable[psutil.Process]) -> str:
    """One line per process: pid, parent and command line."""
    lines = []
    for proc in procs:
        try:
            command = " ".join(proc.cmdline()) or proc.name()
            lines.append(f"pid {proc.pid} (parent {proc.ppid()}): {command}")
        except psutil.Error:
            lines.append(f"pid {proc.pid}: gone while being described")
    return "\n".join(lines)


def reap(procs: Iterable[psutil.Process], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after ``timeout``."""
    procs = [p for p in procs if _alive(p)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


__all__ = ["MARKER", "describe", "leftovers", "mark_session", "reap"]
