"""Eviction policies on request traces: LRU, the cost-aware default, and the offline optimum.

    python benchmarks/bench_traces.py [--requests 300] [--seed 0] [--json] [--window 32] [--tiny]
                                      [--noise none|uniform|heavy] [--traces agent,tools] [--ablation]
                                      [--redraws N]

Six traces, each replayed through the real :class:`ModelManager` (simulated runtime) by
one client, one request after the other, each request holding its lease for 2 s:

* ``uniform`` — every request picks one of 6 models uniformly;
* ``zipf`` — Zipf-skewed picks (s = 1.2) over 6 models in a random popularity order;
* ``bursty`` — runs of the same model (geometric lengths, mean 6);
* ``agent`` — agent loops: episodes of 3–8 rounds over 2–4 models called in turn;
* ``tools`` — agent episodes where a planner model is called between its 1–3 tools;
* ``periodic`` — issue 24's trace: ``a a a b c a b a c`` × 20 = 180 requests over three
  equal models with room for two (LRU 101 loads, optimum 62).

Models (except ``periodic``'s) have unequal sizes and load times drawn for a card of
16, 20 or 24 GB (budget: the card less 1 GB): sizes 20–60 % of the budget, load time
1.5 s + 0.3–1.2 s per GB.  Time is simulated: the manager's clock is a discrete-event
clock that jumps to the next modelled deadline (a load's end, a request's end) once every
task waits, so a prefetch that loads while a request is served overlaps it as it would on
a card, the load seconds the policy measures and the waits reported are exact and the
same on every machine, and the run takes seconds.  Per policy and trace: loads,
load-seconds (Σ modelled load time over the loads made, prefetches included) and p50/p95
of the wait per request (from asking for the lease to holding it).

Policies: ``lru``, ``cost`` (the default) and ``cost+prefetch`` (the default policy with
``prefetch.enabled`` at its default thresholds: the likely next model is loaded in the
background, only into free memory).

``--noise`` makes every load take its model's load time times a factor drawn per load
(the same draws, in load order, for every policy): ``uniform`` ±30 %, ``heavy`` a Pareto
factor (α = 1.5, median 1: one load in ten takes ≥ 2.2×, one in a hundred ≥ 10×) — what a
busy machine does to measured load times.  Only the measurements are noisy: load-seconds
still count each load at its model's true load time (a policy is not charged for the draw
it happened to get, which would swamp the comparison), so the optimum still bounds them.

The offline optimum is exact: a dynamic programme over the sets of resident models
(every subset that fits the budget) along the known trace, where a request for a model
not resident loads it and may evict any subset of the others (demand loading; Belady's
setting with sizes and costs, where loading ahead never lowers the total).  It minimises
load-seconds (then loads); with 6 models that is at most 3^6 moves per request.

For the traces of independent draws (uniform, Zipf) the *online* optimum is also given:
the best policy that knows each model's true probability but not the order
(:func:`online_optimum`, a Markov decision process solved exactly) — what no online
policy beats in expectation, so the floor for ours.  ``--redraws N`` adds its ratio to LRU
over N traces redrawn from the same models and probabilities (one trace's ratio is a draw).

The peer, Ray Serve's ``@serve.multiplexed`` (per-replica LRU by count: the ``lru`` row's
rule), runs the periodic and agent-loop traces on a real Ray node beside modelmora's
``ray`` provider in ``benchmarks/bench_ray_serve.py`` (loads and per-request overhead);
here, where the runtime is simulated, it would only repeat the LRU row.

``--ablation`` adds the ``cost`` policy with its set duel turned off (``cost/bounded``,
``cost/unbounded``, ``cost/frequency``: one next-use estimate each, see
``core/policy.py``'s ``Reuse``).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio

from modelmora import ModelManager
from modelmora import events as ev
from modelmora.core.policy import NEXT_USE_ESTIMATES, NextUseEstimate, Reuse
from modelmora.memory import DeviceMemory, MemoryMonitor, StaticProbe
from modelmora.providers.base import Handle
from modelmora.providers.simulated import SimulatedProvider
from modelmora.spec import ModelSpec

GB = 10**9
SERVICE_S = 2.0  # modelled seconds each request holds its lease
PERIOD = "aaabcabac"


@dataclass(frozen=True)
class Model:
    name: str
    size: int  # bytes on cuda:0
    load_s: float  # modelled seconds


@dataclass(frozen=True)
class Trace:
    name: str
    models: tuple[Model, ...]
    budget: int  # bytes
    requests: tuple[str, ...]
    odds: dict[str, float] | None = None  # independent draws: each model's probability


def card(rng: random.Random, n: int = 6) -> tuple[tuple[Model, ...], int]:
    budget = (rng.choice((16, 20, 24)) - 1) * GB
    models = []
    for i in range(n):
        size = int(budget * rng.uniform(0.2, 0.6))
        load_s = 1.5 + size / GB * rng.uniform(0.3, 1.2)
        models.append(Model(f"m{i}", size, round(load_s, 2)))
    return tuple(models), budget


def traces(n: int, seed: int) -> list[Trace]:
    rng = random.Random(seed)
    out = []

    models, budget = card(rng)
    names = [m.name for m in models]
    uniform = tuple(rng.choice(names) for _ in range(n))
    out.append(Trace("uniform", models, budget, uniform, {m: 1 / len(names) for m in names}))

    models, budget = card(rng)
    names = [m.name for m in models]
    ranked = rng.sample(names, len(names))
    weights = [1 / (k + 1) ** 1.2 for k in range(len(ranked))]
    odds = {m: w / sum(weights) for m, w in zip(ranked, weights, strict=True)}
    out.append(Trace("zipf", models, budget, tuple(rng.choices(ranked, weights, k=n)), odds))

    models, budget = card(rng)
    names = [m.name for m in models]
    bursty: list[str] = []
    while len(bursty) < n:
        length = 1 + int(math.log(1 - rng.random()) / math.log(1 - 1 / 6))  # geometric, mean ~6
        bursty += [rng.choice(names)] * length
    out.append(Trace("bursty", models, budget, tuple(bursty[:n])))

    models, budget = card(rng)
    names = [m.name for m in models]
    agent: list[str] = []
    while len(agent) < n:  # each step of the loop calls its models in turn
        loop = rng.sample(names, rng.randint(2, 4))
        agent += loop * rng.randint(3, 8)
    out.append(Trace("agent", models, budget, tuple(agent[:n])))

    models, budget = card(rng)
    names = [m.name for m in models]
    tools: list[str] = []
    while len(tools) < n:  # a planner model called between tools
        loop = rng.sample(names, rng.randint(2, 4))
        planner, used = loop[0], loop[1:]
        for _ in range(rng.randint(3, 8)):
            tools += [planner, rng.choice(used)]
    out.append(Trace("tools", models, budget, tuple(tools[:n])))

    size, budget = 8 * GB, 16 * GB
    periodic = tuple(Model(x, size, 6.0) for x in "abc")
    out.append(Trace("periodic", periodic, budget, tuple(PERIOD * 20)))
    return out


# -- the offline optimum ----------------------------------------------------------------------


def optimum(trace: Trace) -> tuple[float, int]:
    """Least load-seconds (then loads) of any demand-loading schedule for ``trace``: a
    dynamic programme over the sets of resident models (bit masks) that fit the budget."""
    index = {m.name: i for i, m in enumerate(trace.models)}
    size = [m.size for m in trace.models]
    cost = [m.load_s for m in trace.models]

    def fits(mask: int) -> bool:
        return sum(size[i] for i in range(len(size)) if mask >> i & 1) <= trace.budget

    best: dict[int, tuple[float, int]] = {0: (0.0, 0)}
    for name in trace.requests:
        i = index[name]
        bit = 1 << i
        nxt: dict[int, tuple[float, int]] = {}
        for mask, (seconds, loads) in best.items():
            if mask & bit:
                if (seconds, loads) < nxt.get(mask, (math.inf, 0)):
                    nxt[mask] = (seconds, loads)
                continue
            value = (seconds + cost[i], loads + 1)
            keep = mask  # every subset of what is resident may stay beside it
            while True:
                after = keep | bit
                if value < nxt.get(after, (math.inf, 0)) and fits(after):
                    nxt[after] = value
                if keep == 0:
                    break
                keep = (keep - 1) & mask
        best = nxt
    return min(best.values())


def online_optimum(trace: Trace, rounds: int = 5000) -> tuple[float, int] | None:
    """Load-seconds (and loads) on ``trace`` of the best *online* policy for its draws, for
    traces of independent draws with known probabilities (``trace.odds``; None otherwise).

    Under the independent reference model the best a policy that does not see the future
    can do is the optimal policy of a Markov decision process (Aho, Denning, Ullman,
    "Principles of optimal page replacement", JACM 18(1), 1971, for equal sizes and
    costs: keep the most probable pages).  Here with sizes and costs: states are the
    resident sets that fit the budget, a request for a model not resident costs its load
    seconds and moves to any set that fits, holds it and is a subset of the old set plus
    it; the long-run cost per request is minimised by relative value iteration (Puterman,
    *Markov Decision Processes*, 1994, §8.5.5; damped by half, which keeps the policy and
    makes the iteration converge on periodic chains).  The policy, which knows the true
    probabilities and nothing else, is then replayed on the trace.  No online policy —
    ours included — beats it in expectation (on one finite trace a policy may, by the
    draws' luck); the offline optimum (:func:`optimum`) also knows the order.  Raises
    ValueError when a model does not fit the budget alone, RuntimeError if the iteration
    does not converge in ``rounds``."""
    if trace.odds is None:
        return None
    n = len(trace.models)
    size = [m.size for m in trace.models]
    cost = [m.load_s for m in trace.models]
    p = [trace.odds.get(m.name, 0.0) for m in trace.models]
    states = [s for s in range(1 << n) if sum(size[i] for i in range(n) if s >> i & 1) <= trace.budget]
    fitting = set(states)

    def moves(s: int, i: int) -> list[int]:
        grown, out = s | 1 << i, []
        keep = grown
        while True:  # every subset of grown that holds i and fits
            if keep >> i & 1 and keep in fitting:
                out.append(keep)
            if keep == 0:
                break
            keep = (keep - 1) & grown
        return out

    too_big = [m.name for m, bytes_ in zip(trace.models, size, strict=True) if bytes_ > trace.budget]
    if too_big:
        raise ValueError(f"{too_big[0]} does not fit the budget alone: no policy serves it")
    options = {(s, i): moves(s, i) for s in states for i in range(n) if not s >> i & 1}
    h = dict.fromkeys(states, 0.0)
    for _ in range(rounds):
        best = {key: min(h[t] for t in targets) for key, targets in options.items()}
        new = {
            s: sum(p[i] * (h[s] if s >> i & 1 else cost[i] + best[s, i]) for i in range(n)) for s in states
        }
        ref = new[0]
        new = {s: 0.5 * h[s] + 0.5 * (v - ref) for s, v in new.items()}
        change = max(abs(new[s] - h[s]) for s in states)
        h = new
        if change < 1e-10:
            break
    else:
        raise RuntimeError(f"the value iteration did not converge in {rounds} rounds ({trace.name})")
    index = {m.name: i for i, m in enumerate(trace.models)}
    state, seconds, loads = 0, 0.0, 0
    for name in trace.requests:
        i = index[name]
        if not state >> i & 1:
            state = min(options[state, i], key=lambda t: (h[t], -t))
            seconds, loads = seconds + cost[i], loads + 1
    return seconds, loads


# -- the replay through the manager ----------------------------------------------------------


class Clock:
    """The manager's clock, in modelled seconds, driven as a discrete-event simulation:
    :meth:`sleep` waits for a modelled deadline, and :meth:`drive` jumps to the earliest
    one once every other task waits (nothing runs in a worker thread: see
    :class:`InlineMonitor`)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, anyio.Event]] = []
        self._seq = 0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        event = anyio.Event()
        self._seq += 1
        heapq.heappush(self._timers, (self.now + seconds, self._seq, event))
        await event.wait()

    async def drive(self) -> None:
        """Runs until cancelled: once every task waits, the earliest deadline comes."""
        while True:
            await settled()
            if self._timers:
                deadline, _, event = heapq.heappop(self._timers)
                self.now = max(self.now, deadline)
                event.set()
            else:
                await anyio.sleep(0.001)  # only real timers left (none on the replay's path)


async def settled() -> None:
    """Return once every other asyncio task waits on something not done yet (a loop
    iteration at a time: asyncio's own ``wait_all_tasks_blocked`` sleeps 0.1 s per try)."""
    this = asyncio.current_task()
    while True:
        await asyncio.sleep(0)
        for task in asyncio.all_tasks():
            waiter = getattr(task, "_fut_waiter", None)
            if task is not this and (waiter is None or waiter.done()):
                break
        else:
            return


class InlineMonitor(MemoryMonitor):
    """Reads the (static) probe on the loop: a worker thread would look idle to
    :func:`settled` and let the clock jump while it runs."""

    async def read(self) -> list[DeviceMemory]:
        return self.probe.read()


NOISES = ("none", "uniform", "heavy")


def noise_factor(rng: random.Random, noise: str) -> float:
    """One load's factor on its model's load time (see the module docstring)."""
    if noise == "uniform":
        return rng.uniform(0.7, 1.3)
    if noise == "heavy":  # Pareto, α = 1.5, scaled to median 1
        return 2 ** (-1 / 1.5) * (1 - rng.random()) ** (-1 / 1.5)
    return 1.0


class Sim(SimulatedProvider):
    """The simulated runtime: a load takes the model's load time (times its noise factor)
    on the modelled clock, remembering which model each load was for."""

    def __init__(self, clock: Clock, load_s: dict[str, float], noise: str = "none", seed: int = 0) -> None:
        super().__init__()
        self.clock, self.load_s, self.noise = clock, load_s, noise
        self.rng = random.Random(seed)
        self.loaded: list[str] = []

    async def load(self, spec: ModelSpec) -> Handle:
        self.loaded.append(spec.name)
        await self.clock.sleep(self.load_s[spec.name] * noise_factor(self.rng, self.noise))
        return await super().load(spec)


POLICIES = ("lru", "cost", "cost+prefetch")
ABLATIONS = tuple(
    f"cost/{kind}" for kind in NEXT_USE_ESTIMATES
)  # the default with one next-use estimate only


class OneEstimate(Reuse):
    """The ``cost`` policy's history with the set duel turned off: always one of its
    next-use estimates (``--ablation``)."""

    def __init__(self, window: int, kind: NextUseEstimate) -> None:
        super().__init__(window)
        self.fixed = kind

    @property
    def estimate(self) -> NextUseEstimate:
        return self.fixed


async def replay(
    trace: Trace, policy: str, window: int, noise: str = "none", seed: int = 0
) -> dict[str, Any]:
    clock = Clock()
    sim = Sim(clock, {m.name: m.load_s for m in trace.models}, noise, seed)
    models = {m.name: {"memory": m.size, "load_time": m.load_s} for m in trace.models}
    config: dict[str, Any] = {
        "budgets": {"cuda:0": trace.budget},
        "models": models,
        "eviction": policy.split("+")[0].split("/")[0],
        "prefetch": {"enabled": policy.endswith("+prefetch")},
        "idle_ttl": -1,
        "reaper_interval": 3600,
        "reconcile_interval": 3600,
        "watchdog": {"enabled": False},
    }
    waits = []
    mm = ModelManager(config, providers={"simulated": sim}, probe=StaticProbe({}), clock=clock)
    mm.monitor = InlineMonitor(StaticProbe({}))
    guesses: dict[str, int] = {}  # prefetch outcomes: loaded, gave way, stale, ...

    def count(event: ev.Event) -> None:
        if isinstance(event, ev.Prefetched):
            kind = event.outcome.split(":")[0]
            guesses[kind] = guesses.get(kind, 0) + 1

    mm.events.subscribe(count, leases=False)
    async with mm, anyio.create_task_group() as tg:
        tg.start_soon(clock.drive)
        ablation = policy.partition("/")[2]
        # the window under study (default: the policy's)
        kind = next((k for k in NEXT_USE_ESTIMATES if k == ablation), None)
        mm._core.reuse = OneEstimate(window, kind) if kind else Reuse(window)
        for name in trace.requests:
            asked = clock.now
            async with mm.use(name):
                waits.append(clock.now - asked)
                await clock.sleep(SERVICE_S)
        tg.cancel_scope.cancel()
    by_name = {m.name: m for m in trace.models}
    waits.sort()
    return {
        "loads": len(sim.loaded),
        "load_s": round(sum(by_name[n].load_s for n in sim.loaded), 1),  # at true load times
        "wait_p50_s": round(waits[len(waits) // 2], 2),
        "wait_p95_s": round(waits[min(len(waits) - 1, int(len(waits) * 0.95))], 2),
        "wait_mean_s": round(statistics.fmean(waits), 2),
        "prefetches": guesses,
    }


async def redrawn(trace: Trace, count: int, window: int) -> dict[str, float]:
    """The online optimum over LRU on ``count`` traces redrawn from ``trace``'s models and
    probabilities (seeds 1000, 1001, ...): one trace's ratio is a draw, this its spread."""
    assert trace.odds is not None
    names = list(trace.odds)
    ratios = []
    for k in range(count):
        rng = random.Random(1000 + k)
        again = replace(
            trace, requests=tuple(rng.choices(names, [trace.odds[n] for n in names], k=len(trace.requests)))
        )
        lru = (await replay(again, "lru", window))["load_s"]
        online = online_optimum(again)
        assert online is not None
        ratios.append(online[0] / max(lru, 1e-9))
    return {
        "traces": count,
        "mean": round(statistics.fmean(ratios), 3),
        "sd": round(statistics.stdev(ratios), 3) if count > 1 else 0.0,
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
        "at_most_0.85": sum(r <= 0.85 for r in ratios),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "requests": args.requests,
        "window": args.window,
        "noise": args.noise,
        "traces": {},
    }
    for trace in traces(args.requests, args.seed):
        if args.traces and trace.name not in args.traces:
            continue
        row: dict[str, Any] = {
            "models": [
                {"name": m.name, "gb": round(m.size / GB, 1), "load_s": m.load_s} for m in trace.models
            ],
            "budget_gb": round(trace.budget / GB, 1),
            "requests": len(trace.requests),
        }
        policies = POLICIES + (ABLATIONS if args.ablation else ())
        for policy in policies:
            row[policy] = await replay(trace, policy, args.window, args.noise, args.seed)
        seconds, loads = optimum(trace)
        row["optimum"] = {"loads": loads, "load_s": round(seconds, 1)}
        online = online_optimum(trace)
        if online is not None:
            seconds, loads = online
            row["online_optimum"] = {"loads": loads, "load_s": round(seconds, 1)}
            row["online_optimum_vs_lru"] = round(seconds / max(row["lru"]["load_s"], 1e-9), 3)
            if args.redraws:
                row["online_optimum_redrawn"] = await redrawn(trace, args.redraws, args.window)
        for policy in policies[1:]:
            row[f"{policy}_vs_lru"] = round(row[policy]["load_s"] / max(row["lru"]["load_s"], 1e-9), 3)
        out["traces"][trace.name] = row
    return out


def table(data: dict[str, Any]) -> str:
    policies = [p for p in POLICIES + ABLATIONS if p in next(iter(data["traces"].values()), {})]
    lines = [
        "| trace | optimum loads / load-s | online optimum (× LRU) | "
        + " | ".join(f"{p} loads / load-s (× LRU) | {p} wait p50 / p95" for p in policies)
        + " |",
        "|---|---|---|" + "---|---|" * len(policies),
    ]
    for name, r in data["traces"].items():
        opt = r["optimum"]
        online = r.get("online_optimum")
        best = (
            f"{online['loads']} / {online['load_s']:.0f} ({r['online_optimum_vs_lru']:.2f})"
            if online
            else "—"
        )
        cells = [name, f"{opt['loads']} / {opt['load_s']:.0f}", best]
        for p in policies:
            x = r[p]
            ratio = f" ({r[f'{p}_vs_lru']:.2f})" if p != "lru" else ""
            cells.append(f"{x['loads']} / {x['load_s']:.0f}{ratio}")
            cells.append(f"{x['wait_p50_s']:.1f} / {x['wait_p95_s']:.1f} s")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=300, help="Requests per trace (periodic: always 180)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--window", type=int, default=Reuse().window, help="Reuse gaps the cost policy keeps per model."
    )
    parser.add_argument("--tiny", action="store_true", help="40 requests per trace (a smoke run).")
    parser.add_argument(
        "--noise", choices=NOISES, default="none", help="Per-load noise on load times (see above)."
    )
    parser.add_argument(
        "--traces",
        type=lambda v: v.split(","),
        default=[],
        help="Only these traces, comma-separated (default: all six).",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="Also the cost policy with one next-use estimate only (bounded, unbounded, frequency): no set duel.",
    )
    parser.add_argument(
        "--redraws",
        type=int,
        default=0,
        help="Also the online optimum over LRU on this many traces redrawn like uniform and Zipf.",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.requests < 1 or args.window < 1 or args.redraws < 0:
        parser.error("--requests and --window must be positive, --redraws at least 0")
    unknown = set(args.traces) - {t.name for t in traces(1, 0)}
    if unknown:
        parser.error(f"unknown trace {sorted(unknown)[0]!r}: uniform, zipf, bursty, agent, tools or periodic")
    if args.tiny:
        args.requests = 40
    started = time.perf_counter()
    data = anyio.run(run, args)
    data["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(table(data))
        print(f"\n{data['wall_s']} s wall; waits and load-seconds in modelled seconds.")
        for name, r in data["traces"].items():
            print(f"prefetch guesses acted on, {name}: {r['cost+prefetch']['prefetches'] or 'none'}")
        for name, r in data["traces"].items():
            if "online_optimum_redrawn" in r:
                x = r["online_optimum_redrawn"]
                print(
                    f"online optimum × LRU, {name}, {x['traces']} traces redrawn: mean {x['mean']}, "
                    f"SD {x['sd']}, {x['min']}–{x['max']}, at most 0.85 in {x['at_most_0.85']}"
                )


if __name__ == "__main__":
    main()
