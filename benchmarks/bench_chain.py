"""Chain residency: the exact plan vs the seeds' rule vs always-unload, and prefetch.

    python benchmarks/bench_chain.py [--random 300] [--scale 0.02] [--seed 7] [--large 8]
        [--reference 10] [--sizes 14x200,20x200] [--beams-only] [--json]

Part 1 (modelled, every chain): loads and total switch (load) time of each strategy on
named scenarios plus ``--random`` random chains with unequal sizes and load times.
Part 2 (executed): the named scenarios run through the real executor on the simulated
runtime, whose loads sleep ``load_time x --scale`` seconds and whose steps take a fixed
time, once per strategy and once with prefetch off: wall time and loads as measured.
Part 3 (planner): ``--large`` random chains of each ``--sizes`` (14 and 20 models x 200
steps) planned with the default 200 ms budget in a worker thread while a heartbeat task
on the loop ticks every 10 ms (``--beams-only``: without the integer programme): wall time, method, proven gap, longest heartbeat interval, and distance to a
reference plan searched for ``--reference`` seconds (the optimum where that one is exact);
beside it, the same heartbeat's longest interval next to a worker thread that sleeps (the
bare loop) and next to one that computes in pure Python (what CPython's 5 ms switch
interval alone gives; the planner hands the GIL over every 0.5 ms, ``chain/gil.py``).
SciPy, whose HiGHS solves the integer programme, is imported once per process by the
first plan that needs it (outside that plan's budget): timed apart, before the rows.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio

from modelmora import ModelManager
from modelmora.chain import Chain, PlanModel, Step, plan_always_unload, plan_next_use, plan_residency
from modelmora.chain import search as search_module
from modelmora.chain.plan import ResidencyPlan
from modelmora.chain.search import _highs
from modelmora.memory import StaticProbe
from modelmora.providers.simulated import SimulatedProvider
from modelmora.testing.traces import large_chain

T = TypeVar("T")

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


async def planned_beside_heartbeat(
    seq: list[str], models: dict[str, PlanModel], cap: dict[str, int]
) -> tuple[ResidencyPlan, float, float, int]:
    """(plan, wall s, longest heartbeat interval s, ticks) with the planner in a worker thread."""
    return await beside_heartbeat(lambda: plan_residency(seq, models, cap))


def _idle() -> None:
    time.sleep(0.2)


def _busy() -> None:
    """Pure Python for 0.2 s, never releasing the GIL on purpose: what CPython's switch
    interval alone gives the loop."""
    end, n = time.perf_counter() + 0.2, 0
    while time.perf_counter() < end:
        n += 1


def heartbeat_baselines(runs: int = 3) -> dict[str, float]:
    """Longest heartbeat interval (s, worst of ``runs``) beside a worker thread that sleeps
    (the bare loop) and one that computes in pure Python without handing the GIL over."""
    return {
        name: max(anyio.run(beside_heartbeat, work)[2] for _ in range(runs))
        for name, work in (("idle_thread", _idle), ("busy_thread", _busy))
    }


async def beside_heartbeat(work: Callable[[], T]) -> tuple[T, float, float, int]:
    """(``work()``'s result, wall s, longest heartbeat interval s, ticks) with ``work`` in a
    worker thread and a task on the loop that sleeps 10 ms at a time."""
    done = anyio.Event()
    longest, ticks = 0.0, 0

    async def heartbeat() -> None:
        nonlocal longest, ticks
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.01)
            now = time.perf_counter()
            longest, ticks, last = max(longest, now - last), ticks + 1, now

    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        started = time.perf_counter()
        result = await anyio.to_thread.run_sync(work)
        wall = time.perf_counter() - started
        done.set()
    return result, wall, longest, ticks


def planner_figures(
    count: int, reference_s: float, sizes: list[tuple[int, int]], beams_only: bool = False
) -> dict[str, Any]:
    # SciPy (HiGHS) is imported once per process, on the first plan that needs the search;
    # timed here on its own so that the rows show the planner's own wall time
    started = time.perf_counter()
    _highs()
    out: dict[str, Any] = {"scipy_import_s": time.perf_counter() - started}
    out["heartbeat_baselines"] = heartbeat_baselines()
    for n, length in sizes:
        rows = []
        for seed in range(count):
            seq, models, cap = large_chain(seed, n, length)
            share = search_module._MILP_SHARE
            if beams_only:  # the ablation: the search without the integer programme
                search_module._MILP_SHARE = 0.0
            try:
                plan, wall, longest, ticks = anyio.run(planned_beside_heartbeat, seq, models, cap)
            finally:
                search_module._MILP_SHARE = share
            ref = plan_residency(seq, models, cap, time_budget=reference_s)
            rows.append({
                "seed": seed, "wall_s": wall, "method": plan.method, "gap": plan.gap,
                "load_s": plan.load_time, "reference_s": ref.load_time, "reference_exact": ref.method == "exact",
                "above_reference": plan.load_time / ref.load_time - 1 if ref.load_time else 0.0,
                "longest_tick_s": longest, "ticks": ticks,
            })  # fmt: skip
        out[f"{n} models x {length} steps"] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--random", type=int, default=300)
    parser.add_argument("--scale", type=float, default=0.02, help="Seconds slept per modelled load second.")
    parser.add_argument("--step", type=float, default=0.05, help="Seconds each step computes.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--large", type=int, default=8, help="Random chains of each size for the planner.")
    parser.add_argument(
        "--sizes",
        type=lambda v: [tuple(int(x) for x in size.split("x")) for size in v.split(",")],
        default=[(14, 200), (20, 200)],
        help="Planner chain sizes, models x steps, comma-separated (default 14x200,20x200).",
    )
    parser.add_argument(
        "--beams-only",
        action="store_true",
        help="Part 3 without the integer programme (the beam searches alone), for comparison.",
    )
    parser.add_argument("--reference", type=float, default=10.0, help="Seconds for each reference plan.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.random < 1 or args.large < 0 or args.scale <= 0 or args.reference <= 0:
        parser.error("--random must be at least 1, --large at least 0, --scale and --reference positive")

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
    report["planner"] = planner_figures(args.large, args.reference, args.sizes, args.beams_only)
    report["settings"] = {
        "scale": args.scale, "step_s": args.step, "random": args.random, "seed": args.seed,
        "large": args.large, "reference_s": args.reference,
    }  # fmt: skip

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

    print("\nPlanner: 200 ms budget in a worker thread, heartbeat every 10 ms on the loop")
    print(f"{'chains':24} {'wall max':>9} {'exact':>6} {'proven gap mean/max':>20} "
          f"{'above reference mean/max':>25} {'ref exact':>9} {'longest tick':>13}")  # fmt: skip
    for name, rows in report["planner"].items():
        if name in ("scipy_import_s", "heartbeat_baselines"):
            continue
        gaps = [r["gap"] for r in rows if r["method"] == "anytime"] or [0.0]
        above = [r["above_reference"] for r in rows]
        print(
            f"{name:24} {max(r['wall_s'] for r in rows):>8.3f}s {sum(r['method'] == 'exact' for r in rows):>3}/{len(rows):<2} "
            f"{statistics.mean(gaps):>9.1%} / {max(gaps):>6.1%} {statistics.mean(above):>13.2%} / {max(above):>7.2%} "
            f"{sum(r['reference_exact'] for r in rows):>6}/{len(rows):<2} {max(r['longest_tick_s'] for r in rows) * 1000:>10.1f} ms"
        )
    base = report["planner"]["heartbeat_baselines"]
    print(
        f"(longest tick beside a worker thread that sleeps: {base['idle_thread'] * 1000:.1f} ms; "
        f"one that computes in pure Python: {base['busy_thread'] * 1000:.1f} ms)"
    )
    print(
        f"(the first plan that reaches the search imports SciPy, once per process and outside the "
        f"budget: {report['planner']['scipy_import_s']:.2f} s here, timed apart)"
    )


if __name__ == "__main__":
    main()
