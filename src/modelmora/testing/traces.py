"""Request traces shared by benchmarks and tests, so a test replays exactly what a
benchmark measured."""

from __future__ import annotations

import random


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
