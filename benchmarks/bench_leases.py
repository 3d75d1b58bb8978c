"""Lease hot path: `use()` enter+exit on a resident model vs a lock-and-dict baseline.

    python benchmarks/bench_leases.py [--n 20000] [--repeat 7] [--json]

The baseline is the seeds' hand-rolled manager reduced to its core: an ``asyncio.Lock``
around a dict of reference counts.  Both are measured in the same process and run, and
the report gives medians over ``--repeat`` rounds plus the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio
import anyio.lowlevel

from modelmora import ModelManager
from modelmora.memory import StaticProbe
from modelmora.providers.simulated import SimulatedProvider


class LockDictLeases:
    """The baseline: what a seed's ModelManager singleton does per use."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.refs: dict[str, int] = {"m": 0}
        self.models: dict[str, object] = {"m": object()}

    def use(self, name: str) -> _BaselineLease:
        return _BaselineLease(self, name)


class _BaselineLease:
    def __init__(self, mgr: LockDictLeases, name: str):
        self.mgr, self.name = mgr, name

    async def __aenter__(self) -> object:
        async with self.mgr.lock:
            self.mgr.refs[self.name] += 1
            return self.mgr.models[self.name]

    async def __aexit__(self, *exc: object) -> None:
        async with self.mgr.lock:
            self.mgr.refs[self.name] -= 1


async def per_op(use: Any, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        async with use("m"):
            pass
    return (time.perf_counter() - start) / n


async def throughput(use: Any, tasks: int, per_task: int) -> float:
    async def worker() -> None:
        for _ in range(per_task):
            async with use("m"):
                await anyio.lowlevel.checkpoint()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    return tasks * per_task / (time.perf_counter() - start)


async def singleflight(n: int) -> tuple[int, float]:
    sim = SimulatedProvider()
    cfg = {"models": {"m": {"memory": "1GB", "options": {"load_time": 0.01}}}}
    async with ModelManager(cfg, providers={"simulated": sim}, probe=StaticProbe({})) as mm:

        async def user() -> None:
            async with mm.use("m"):
                pass

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(user)
        return sim.stats.loads, time.perf_counter() - start


async def main(n: int, repeat: int) -> dict[str, Any]:
    sim = SimulatedProvider()
    async with ModelManager(
        {"models": {"m": {"memory": "1GB"}}}, providers={"simulated": sim}, probe=StaticProbe({})
    ) as mm:
        await mm.load("m")
        baseline = LockDictLeases()
        await per_op(mm.use, 2000)  # warm up both
        await per_op(baseline.use, 2000)
        ours, base = [], []
        for _ in range(repeat):  # interleaved so drift hits both equally
            ours.append(await per_op(mm.use, n))
            base.append(await per_op(baseline.use, n))
        tp_ours = statistics.median([await throughput(mm.use, 100, 200) for _ in range(3)])
        tp_base = statistics.median([await throughput(baseline.use, 100, 200) for _ in range(3)])
    loads, sf_wall = await singleflight(1000)
    m_ours, m_base = statistics.median(ours) * 1e6, statistics.median(base) * 1e6
    return {
        "use_enter_exit_us": {
            "modelmora": round(m_ours, 2),
            "lock_dict_baseline": round(m_base, 2),
            "ratio": round(m_ours / m_base, 2),
        },
        "lease_throughput_per_s": {
            "modelmora": round(tp_ours),
            "lock_dict_baseline": round(tp_base),
            "tasks": 100,
        },
        "singleflight_1000_first_uses": {"provider_loads": loads, "wall_s": round(sf_wall, 3)},
        "n": n,
        "repeat": repeat,
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = anyio.run(main, args.n, args.repeat)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        u, t, s = (
            result["use_enter_exit_us"],
            result["lease_throughput_per_s"],
            result["singleflight_1000_first_uses"],
        )
        print(f"use() enter+exit, resident model (median of {args.repeat} x {args.n}):")
        print(f"  modelmora            {u['modelmora']:8.2f} us")
        print(f"  asyncio.Lock + dict  {u['lock_dict_baseline']:8.2f} us   (ratio {u['ratio']}x)")
        print(
            f"lease throughput, 100 concurrent tasks: modelmora {t['modelmora']:,}/s, baseline {t['lock_dict_baseline']:,}/s"
        )
        print(
            f"singleflight: 1000 concurrent first uses -> {s['provider_loads']} provider load(s), {s['wall_s']}s wall"
        )
