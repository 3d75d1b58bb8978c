"""The session check behind conftest's no_process_outlives_the_run: it finds a server whose
parent exited (re-parented away from the test run), names it, and stops it."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from modelmora.testing.leaks import MARKER, describe, leftovers, reap

ORPHAN = "import time; time.sleep(120)  # orphan-for-test_leaks"
# the orphan must not hold the spawner's output pipes, or subprocess.run would wait for it
SPAWN = (
    "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
    f"{ORPHAN!r}], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"
)


def test_a_process_whose_parent_exited_is_found_named_and_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MARKER, "test-leaks")
    pid = int(
        subprocess.run([sys.executable, "-c", SPAWN], capture_output=True, text=True, check=True).stdout
    )
    orphan = psutil.Process(pid)
    try:
        assert orphan.ppid() != psutil.Process().pid  # the parent is gone: not our descendant
        left = leftovers("test-leaks", grace=0.2, descendants=False)
        assert [p.pid for p in left] == [pid]
        assert f"pid {pid} (parent " in describe(left) and "orphan-for-test_leaks" in describe(left)
        reap(left)
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        assert leftovers("test-leaks", grace=0.2, descendants=False) == []
    finally:
        reap([orphan])


def test_a_process_that_exits_within_the_grace_period_is_not_a_leftover(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MARKER, "test-leaks-grace")
    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    try:
        assert leftovers("test-leaks-grace", grace=10, descendants=False) == []
    finally:
        quick.wait(10)
