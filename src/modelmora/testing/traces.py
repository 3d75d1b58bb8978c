"""Request traces and chains shared by benchmarks and tests, so a test replays exactly
what a benchmark measured."""

from __future__ import annotations

import random

from ..chain.plan import PlanModel

GB = 10**9


def agent_bursts_random(models: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` model names drawn from ``models`` in runs of three kinds, each chosen at random:
    a planner model called in a loop with detours to a tool model, a burst on one model,
    and uniform picks (``benchmarks/bench_llamacpp_router.py``'s trace).  The same
    ``seed`` gives the same trace."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        pattern = rng.choice(("agent", "burst", "random"))
        if pattern == "agent":  # a planner model called in a loop, with detours to a tool model
            planner, tool = rng.sample(models, 2)
            for _ in range(rng.randint(3, 6)):
                out += [planner] * rng.randint(1, 3) + [tool]
        elif pattern == "burst":
            out += [rng.choice(models)] * rng.randint(4, 10)
        else:
            out += [rng.choice(models) for _ in range(rng.randint(4, 10))]
    return out[:n]


def large_chain(seed: int, n: int, steps: int) -> tuple[list[str], dict[str, PlanModel], dict[str, int]]:
    """A chain for the planner: ``n`` models of 1-14 GB with 1-15 s loads, ``steps`` uses
    skewed towards a few of them, and a budget (bytes, ``cuda:0``) of 1.3-3x the largest
    model (``benchmarks/bench_chain.py``'s part 3).  The same ``seed`` gives the same chain."""
    rng = random.Random(seed)
    sizes = {f"m{i:02d}": rng.choice([1, 2, 4, 7, 11, 14]) for i in range(n)}
    models = {
        k: PlanModel(k, {"cuda:0": s * GB}, float(rng.choice([1, 2, 4, 8, 15]))) for k, s in sizes.items()
    }
    weights = [rng.random() ** 2 + 0.05 for _ in sizes]
    sequence = rng.choices(list(sizes), weights=weights, k=steps)
    return sequence, models, {"cuda:0": int(max(sizes.values()) * rng.choice([1.3, 1.7, 2.2, 3.0]) * GB)}
