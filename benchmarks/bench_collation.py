"""Collation by model under a mixed workload: swaps and latency with and without it.

    python benchmarks/bench_collation.py [--clients 8] [--requests 20] [--load-delay 0.5] [--json]

Two models of one exclusive group (only one fits) behind the proxy, in front of the Ollama
emulator (loads take ``--load-delay`` seconds: a 14B model's ~5 s cold start scaled by
1/10; answers stream 8 tokens 10 ms apart).  ``--clients`` clients each send
``--requests`` chat requests one after the other, each for ``qwen`` with probability 0.7,
else ``mistral`` (seeded, so both runs see the same sequence).  The run is repeated with
``scheduling.max_batch_before_swap: 0`` (no collation: a waiting load stops the resident
model's new leases at once) and with the default (4): the report gives the swaps (the
emulator's loads), p50/p95 latency per model and the longest wait.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio
import httpx

from modelmora.server import create_app
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer

MODELS = {"qwen": "qwen2.5:14b", "mistral": "mistral-small:22b"}
PROMPT = "one two three four five six seven eight"


def workload(clients: int, requests: int, seed: int = 25) -> list[list[str]]:
    rng = random.Random(seed)
    return [["qwen" if rng.random() < 0.7 else "mistral" for _ in range(requests)] for _ in range(clients)]


async def drive(url: str, plan: list[list[str]]) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {name: [] for name in MODELS}

    async def client(http: httpx.AsyncClient, names: list[str]) -> None:
        for name in names:
            body = {"model": name, "messages": [{"role": "user", "content": PROMPT}]}
            t = time.perf_counter()
            reply = await http.post("/v1/chat/completions", json=body)
            if reply.status_code != 200:
                raise RuntimeError(f"{name}: HTTP {reply.status_code}: {reply.text[:200]}")
            latencies[name].append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=len(plan) + 2, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http,
        anyio.create_task_group() as tg,
    ):
        for names in plan:
            tg.start_soon(client, http, names)
    return latencies


def run(batch: int, plan: list[list[str]], load_delay: float) -> dict[str, Any]:
    emu = OllamaEmulator(
        models={t: "10GB" for t in MODELS.values()}, vram="48GB", load_delay=load_delay, token_delay=0.01
    ).start()
    context = min(
        emu.state.default_num_ctx or 2048, min(m.context_length for m in emu.state.catalogue.values())
    )
    config = {
        "budgets": {"cuda:0": "16GB"},
        "providers": {"ollama": {"base_url": emu.url, "num_ctx": context}},
        "models": {n: {"provider": "ollama", "target": t, "memory": "10GB", "group": "heavy"} for n, t in MODELS.items()},
        "scheduling": {"max_batch_before_swap": batch},
    }  # fmt: skip
    server = ThreadedServer(create_app(config, queue_limit=1000)).start()
    try:
        started = time.perf_counter()
        latencies = anyio.run(drive, server.url, plan)
        wall = time.perf_counter() - started
        swaps = emu.stats.loads
    finally:
        server.stop()
        emu.stop()
    row: dict[str, Any] = {"max_batch_before_swap": batch, "swaps": swaps, "wall_s": wall}
    for name, values in latencies.items():
        q = statistics.quantiles(values, n=100) if len(values) >= 2 else [values[0]] * 99
        row[name] = {"requests": len(values), "p50_s": q[49], "p95_s": q[94]}
    row["longest_wait_s"] = max(max(v) for v in latencies.values())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--load-delay", type=float, default=0.5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    plan = workload(args.clients, args.requests)
    rows = [run(batch, plan, args.load_delay) for batch in (0, 4)]
    if args.json:
        print(json.dumps({"clients": args.clients, "requests": args.requests, "load_delay_s": args.load_delay, "runs": rows}, indent=2))  # fmt: skip
        return
    print(f"{args.clients} clients x {args.requests} requests (70 % qwen, 30 % mistral, one exclusive group), "
          f"loads {args.load_delay:.2f} s")  # fmt: skip
    print(f"{'max_batch_before_swap':>22} {'swaps':>6} {'qwen p50':>9} {'qwen p95':>9} {'mistral p50':>12} {'mistral p95':>12} {'longest':>8} {'wall':>7}")  # fmt: skip
    for r in rows:
        q, m = r["qwen"], r["mistral"]
        print(f"{r['max_batch_before_swap']:>22} {r['swaps']:>6} {q['p50_s']:>8.2f}s {q['p95_s']:>8.2f}s "
              f"{m['p50_s']:>11.2f}s {m['p95_s']:>11.2f}s {r['longest_wait_s']:>7.2f}s {r['wall_s']:>6.1f}s")  # fmt: skip


if __name__ == "__main__":
    main()
