"""The process provider on the real llama.cpp server: cold start and stop through the
manager vs the same thing done by hand (Popen, poll the health URL, SIGTERM, wait).

    python benchmarks/bench_process.py [--repeat 5] [--json]

Both sides start the same command on the same tiny GGUF in the same run; the difference
is the manager's overhead (admission, state file, log file, process-group handling).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio
import httpx

from modelmora import ModelManager
from modelmora.memory import StaticProbe
from modelmora.net import free_port
from modelmora.testing.gguf import make_tiny_gguf


def command(model: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def by_hand(model: Path) -> tuple[float, float]:
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        command(model, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    ready = time.perf_counter() - started
    started = time.perf_counter()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
    return ready, time.perf_counter() - started


async def managed(model: Path, state: Path) -> tuple[float, float]:
    cfg = {
        "providers": {"process": {"state_dir": str(state)}},
        "models": {"tiny": {"provider": "process", "target": str(model), "device": "cpu", "memory": "100MB",
                            "options": {"command": [*command(model, 0)[:-1], "${PORT}"], "health": "/v1/models"}}},
    }  # fmt: skip
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        started = time.perf_counter()
        await mm.load("tiny")
        ready = time.perf_counter() - started
        started = time.perf_counter()
        await mm.unload("tiny")
        return ready, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_gguf(Path(tmp) / "tiny.gguf")
        hand, mine = [], []
        for _ in range(args.repeat):  # interleaved, so drift hits both sides alike
            hand.append(by_hand(model))
            mine.append(anyio.run(managed, model, Path(tmp) / "state"))
    report: dict[str, Any] = {}
    for label, i in (("start_to_ready_s", 0), ("stop_s", 1)):
        raw, ours = statistics.median(h[i] for h in hand), statistics.median(m[i] for m in mine)
        report[label] = {"by_hand": raw, "manager": ours, "overhead": ours - raw}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"llama.cpp server on a tiny GGUF, median of {args.repeat}")
    print(f"{'':18} {'by hand':>10} {'manager':>10} {'overhead':>10}")
    for label, r in report.items():
        print(f"{label:18} {r['by_hand']:>9.3f}s {r['manager']:>9.3f}s {r['overhead'] * 1000:>+8.1f}ms")


if __name__ == "__main__":
    main()
