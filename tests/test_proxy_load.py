"""The proxy load test, bounded: a server process, clients at two concurrency levels,
requests alternating between two models that cannot be resident together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_no_request_is_lost_or_answered_by_the_wrong_model() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/load_proxy.py", "--json", "--requests", "40", "--levels", "1,10,40", "--load-delay", "0.01"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert [r["concurrency"] for r in report["levels"]] == [1, 10, 40]
    for row in report["levels"]:
        assert row["lost"] == 0 and row["wrong_model"] == 0, row
        assert row["ok"] == 40
    assert report["levels"][0]["swaps"] == 40  # one client alternating: every request swaps
    assert report["levels"][2]["swaps"] < 40  # many clients: requests for a resident model share it


@pytest.mark.slow
def test_retrying_clients_do_not_make_a_small_queue_thrash() -> None:
    """Issue 16 item 10: 503s retried every 0.5 s against --queue-limit 8 must not swap the
    exclusive group back and forth: it was red at 12 swaps where a queue big enough for
    everyone does 2.  How many of the retries land in one batch depends on timing on this
    2-core box (measured 2 to 4 over ten runs on 2026-12-07, with the same code; 2 to 4
    also when only the server's imports changed), so the bound sits halfway between the
    ideal and the thrash it guards against; collating requests by model (issue 25) is
    what makes it exact."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/load_proxy.py", "--json", "--retrying", "60", "--queue-limit", "8", "--load-delay", "0.5"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["lost"] == 0 and report["wrong_model"] == 0, report
    assert report["swaps"] <= 6, report
