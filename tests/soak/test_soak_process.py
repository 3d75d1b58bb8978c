"""The soak workload against the process provider with real server processes: loads that
fail (the server exits before it is ready), servers killed while leased, cancellations.
At the end no server process may be left running."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path

import psutil
import pytest

from modelmora import ModelManager
from modelmora.memory import StaticProbe

from .harness import Faults, Soak, soak_ops

pytestmark = [pytest.mark.anyio, pytest.mark.soak]
MB = 10**6

# python -m http.server, unless a flag file says this start must fail
SERVER = """
import os, sys, runpy
flag = sys.argv[1]
if os.path.exists(flag):
    os.remove(flag)
    print("refusing to start: injected failure", flush=True)
    sys.exit(3)
sys.argv = ["http.server", sys.argv[2], "--bind", "127.0.0.1"]
runpy.run_module("http.server", run_name="__main__")
"""


def servers(script: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(script) in (p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


async def test_soak_on_the_process_provider(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    flags = tmp_path / "flags"
    flags.mkdir()
    names = ["a", "b", "c", "d"]
    models = {
        n: {"provider": "process", "target": n, "device": "cpu", "memory": f"{40 + 10 * i}MB", "keep_alive": ttl,
            "load_timeout": 10, "options": {"command": [sys.executable, str(script), str(flags / n), "${PORT}"],
                                            "health": "/", "ready_timeout": "8s"}}
        for i, (n, ttl) in enumerate(zip(names, [0, 0.2, -1, 1], strict=True))
    }  # fmt: skip
    config = {
        "budgets": {"cpu": "100MB"}, "models": models, "wait_timeout": 1, "reconcile_interval": 0.2,
        "failure_cooldown": 0.01, "failure_cooldown_max": 0.05, "reaper_interval": 0.02,
        "providers": {"process": {"state_dir": str(tmp_path / "state"), "stop_grace": "2s", "poll_interval": 0.02}},
    }  # fmt: skip

    def kill(target: str) -> None:  # a server that dies while leased (or idle)
        for p in servers(script):
            if str(flags / target) in p.cmdline():
                p.send_signal(signal.SIGKILL)

    def held() -> dict[str, int]:
        # what the servers really hold: their RSS, which is also what the provider reports
        total = 0
        for p in servers(script):
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return {"cpu": total}

    faults = Faults(
        fail_next=lambda t: (flags / t).write_text("fail"),
        hang_next=None,
        unhang=lambda t: None,
        evict=kill,
        set_reachable=None,
        held=held,
    )
    async with ModelManager(config, probe=StaticProbe({})) as mm:
        soak = Soak(mm, faults, names, {"cpu": 100 * MB}, seed=5)
        result = await soak.run(soak_ops(150))
        for entry in mm.entries():
            assert entry.leases == 0, entry
        await mm.unload_all(force=True)
        assert mm.entries() == []
    summary = result.summary()
    print(json.dumps(summary))
    assert not result.violations, result.violations[:5]
    assert servers(script) == [], "orphan server processes"
    assert summary["faults_injected"] > 10 and result.outcomes["lease ok"] > 10
