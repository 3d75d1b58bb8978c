"""Chain residency: the exact plan vs the seeds' rule vs always-unload, and prefetch.

    python benchmarks/bench_chain.py [--random 300] [--scale 0.02] [--seed 7] [--json]

Part 1 (modelled, every chain): loads and total switch (load) time of each strategy on
named scenarios plus ``--random`` random chains with unequal sizes and load times.
Part 2 (executed): the named scenarios run through the real executor on the simulated
runtime, whose loads sleep ``load_time x --scale`` seconds and whose steps take a fixed
time, once per strategy and once with prefetch off: wall time and loads as measured.
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

from modelmora import ModelManager
from modelmora.chain import Chain, PlanModel, Step, plan_always_unload, plan_next_use, plan_residency
from modelmora.memory import StaticProbe
from modelmora.providers.simulated import SimulatedProvider

GB = 10**9

# name -> (budget GB, {model: (GB, load s, group)}, sequence)
SCENARIOS: dict[str, tuple[float, dict[str, tuple[float, float, str | None]], list[str]]] = {
    "seed analysis (24 GB)": (
        24, {"mistral-small": (13, 6, None), "deepseek-r1": (20, 9, None)},
        ["mistral-small", "deepseek-r1", "mistral-small"],
    ),
    "agent loop (24 GB)": (
        24, {"router": (4, 2, None), "coder": (14, 8, None), "embed": (1, 1, None)},
        ["router", "embed", "coder", "router", "embed", "coder", "router"],
    ),
    "LLM->SDXL->TTS (16 GB)": (
        15.5, {"qwen-14b": (11.5, 8, "heavy"), "sdxl": (10.5, 12, "heavy"), "tts": (3.5, 3, None)},
        ["qwen-14b", "sdxl", "tts", "qwen-14b", "tts"],
    ),
    "RAG with rerank (16 GB)": (
        16, {"embed": (1.2, 1.5, None), "rerank": (2.5, 2, None), "llm": (11, 7, None)},
        ["embed", "rerank", "llm", "embed", "rerank", "llm"],
    ),
    "batched voice-over (16 GB)": (
        15.5, {"llm": (11, 7, None), "tts": (3.5, 3, None), "sdxl": (10.5, 12, None)},
        ["llm", "llm", "tts", "tts", "sdxl", "llm", "tts"],
    ),
    "big and small (24 GB)": (
        24, {"70b": (20, 25, None), "8b": (6, 4, None), "3b": (3, 2, None)},
        ["8b", "70b", "3b", "8b", "70b", "3b", "8b"],
    ),
}  # fmt: skip


def modelled(
    budget: float, spec: dict[str, tuple[float, float, str | None]], seq: list[str]
) -> dict[str, Any]:
    models = {n: PlanModel(n, {"cuda:0": int(s * GB)}, t, g) for n, (s, t, g) in spec.items()}
    cap = {"cuda:0": int(budget * GB)}
    plans = {
        "optimal": plan_residency(seq, models, cap),
        "next-use (seeds)": plan_next_use(seq, models),
        "always-unload": plan_always_unload(seq, models),
    }
    return {k: {"loads": p.loads, "switch_s": p.load_time} for k, p in plans.items()}


def random_chains(
    n: int, seed: int
) -> list[tuple[float, dict[str, tuple[float, float, str | None]], list[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(2, 6)
        spec = {
            f"m{i}": (rng.choice([1, 2, 4, 7, 11, 14]), rng.choice([1, 2, 4, 8, 15]), None) for i in range(k)
        }
        seq = [rng.choice(list(spec)) for _ in range(rng.randint(3, 12))]
        budget = max(s for s, _, _ in spec.values()) * rng.choice([1.0, 1.3, 1.7, 2.2])
        out.append((budget, spec, seq))
    return out


async def executed(
    budget: float, spec: dict[str, tuple[float, float, str | None]], seq: list[str], scale: float,
    strategy: str, prefetch: bool, step_s: float,
) -> dict[str, Any]:  # fmt: skip
    models = {
        n: {"memory": f"{s}GB", "load_time": t, "group": g, "options": {"load_time": t * scale}}
        for n, (s, t, g) in spec.items()
    }
    sim = SimulatedProvider()
    cfg = {"budgets": {"cuda:0": f"{budget}GB"}, "models": models, "idle_ttl": 0}

    async def work(model: Any, value: Any) -> Any:
        await anyio.sleep(step_s)
        return value

    async with ModelManager(cfg, providers={"simulated": sim}, probe=StaticProbe({})) as mm:
        chain = Chain(
            [Step(m, call=work) for m in seq], manager=mm,
            management={"strategy": strategy, "prefetch": prefetch},
        )  # fmt: skip
        started = time.perf_counter()
        result = await chain.run("x")
        wall = time.perf_counter() - started
    assert result.ok, result.reason
    return {"loads": sim.stats.loads, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--random", type=int, default=300)
    parser.add_argument("--scale", type=float, default=0.02, help="Seconds slept per modelled load second.")
    parser.add_argument("--step", type=float, default=0.05, help="Seconds each step computes.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    report: dict[str, Any] = {"scenarios": {}, "executed": {}}
    for name, (budget, spec, seq) in SCENARIOS.items():
        report["scenarios"][name] = modelled(budget, spec, seq)
    rand = [modelled(*c) for c in random_chains(args.random, args.seed)]
    totals = {k: {m: sum(r[k][m] for r in rand) for m in ("loads", "switch_s")} for k in rand[0]}
    worse = sum(r["optimal"]["switch_s"] > r["next-use (seeds)"]["switch_s"] + 1e-9 for r in rand)
    better = sum(r["optimal"]["switch_s"] < r["next-use (seeds)"]["switch_s"] - 1e-9 for r in rand)
    report["random"] = {
        "chains": len(rand),
        "totals": totals,
        "optimal_better": better,
        "optimal_worse": worse,
    }

    runs = [("optimal", True), ("optimal", False), ("next-use", False), ("always-unload", False)]
    for name, (budget, spec, seq) in SCENARIOS.items():
        row = {}
        for strategy, prefetch in runs:
            walls = []
            for _ in range(3):
                r = anyio.run(executed, budget, spec, seq, args.scale, strategy, prefetch, args.step)
                walls.append(r["wall_s"])
            row[f"{strategy}{'+prefetch' if prefetch else ''}"] = {
                "loads": r["loads"],
                "wall_s": statistics.median(walls),
            }
        report["executed"][name] = row
    report["settings"] = {"scale": args.scale, "step_s": args.step, "random": args.random, "seed": args.seed}

    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("Modelled: loads / switch seconds per strategy")
    print(f"{'chain':26} {'optimal':>14} {'next-use (seeds)':>18} {'always-unload':>15}")
    for name, r in report["scenarios"].items():
        cells = [
            f"{r[k]['loads']} / {r[k]['switch_s']:.1f}s"
            for k in ("optimal", "next-use (seeds)", "always-unload")
        ]
        print(f"{name:26} {cells[0]:>14} {cells[1]:>18} {cells[2]:>15}")
    t = report["random"]["totals"]
    print(
        f"{args.random} random chains: optimal {t['optimal']['loads']} loads / {t['optimal']['switch_s']:.0f}s, "
        f"seeds' rule {t['next-use (seeds)']['loads']} / {t['next-use (seeds)']['switch_s']:.0f}s, "
        f"always-unload {t['always-unload']['loads']} / {t['always-unload']['switch_s']:.0f}s; "
        f"optimal better on {better}, worse on {worse}"
    )
    print(
        f"\nExecuted on the simulated runtime (load = modelled s x {args.scale}, step = {args.step}s; median of 3)"
    )
    cols = [f"{s}{'+prefetch' if p else ''}" for s, p in runs]
    print(f"{'chain':26} " + " ".join(f"{c:>22}" for c in cols))
    for name, row in report["executed"].items():
        print(
            f"{name:26} "
            + " ".join(f"{row[c]['loads']:>3} loads {row[c]['wall_s']:>8.3f}s    " for c in cols)
        )


if __name__ == "__main__":
    main()
