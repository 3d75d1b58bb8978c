"""Residency plans for a chain whose steps are known before it runs.

A chain is a sequence of model uses.  Keeping a model between its uses saves a reload;
keeping it costs memory other steps may need.  With equal sizes and load times Belady's
farthest-next-use rule is optimal, but real chains mix a 4 GB TTS model with a 12 GB LLM
and a 10 s SDXL load with a 2 s one.  Chains are short, so :func:`plan_residency` finds
the exact minimum total load time by dynamic programming over resident sets: models load
only on demand, and when a load needs room the search tries every minimal set of
evictions.  Keeping more never hurts when evicting is free, so a load that fits evicts
nothing.  That search is exponential in the number of models (69.6 s for 14 models x 200
steps), so it gets a tenth of the time budget (default :data:`TIME_BUDGET`, 200 ms) and
only up to :data:`EXACT_LIMIT` models; past that :mod:`.search` takes over: a widening
beam search that is exact when it finishes and otherwise returns its best plan so far with
a Lagrangian lower bound, so the plan says ``method="anytime"`` and how far from the
optimum it can be at most (:attr:`ResidencyPlan.gap`).

The search works lazily (evict at the moment of need); the plan it returns is eager: a
model is unloaded right after its last use, or right after a use if the plan would drop
it before the next one anyway, so memory goes back to the box as early as possible at no
extra load.  Everything here is pure; the executor carries the plan out.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from ..spec import format_size
from .gil import handover
from .search import SearchProblem, search

EXACT_LIMIT = 14
"""Most distinct models the exact dynamic programme takes on (each state is a subset of them)."""

STATE_LIMIT = 50_000
"""Most resident sets the exact search keeps per step before handing over to the anytime search."""

TIME_BUDGET = 0.2
"""Seconds :func:`plan_residency` searches by default before it settles for its best plan."""

Method = Literal["exact", "anytime", "next-use", "always-unload"]


@dataclass(frozen=True, slots=True)
class PlanModel:
    """What the planner knows of one model: its footprint and what a load costs."""

    name: str
    memory: Mapping[str, int] = field(default_factory=dict)
    load_time: float = 1.0
    group: str | None = None


@dataclass(frozen=True, slots=True)
class PlannedStep:
    index: int
    model: str | None
    load: bool  # the model is not resident when the step starts
    resident: tuple[str, ...]  # the chain's models resident while the step runs
    unload_after: tuple[str, ...]  # released after the step (unloaded if the chain loaded them)
    prefetch: str | None = None  # next step's model, loaded while this step runs


@dataclass(frozen=True, slots=True)
class ResidencyPlan:
    steps: tuple[PlannedStep, ...]
    models: Mapping[str, PlanModel]
    capacity: Mapping[str, int]
    method: Method
    lower_bound: float | None = None  # load seconds no plan can beat (None: not computed)
    search_s: float = 0.0  # seconds the planner searched

    @property
    def gap(self) -> float:
        """How far above the optimum this plan's load time can be at most, as a fraction
        (0.0 for an exact plan; ``inf`` when no lower bound is known)."""
        if self.method == "exact":
            return 0.0
        if self.lower_bound is None:
            return math.inf
        if self.load_time <= self.lower_bound:
            return 0.0
        return (self.load_time - self.lower_bound) / self.lower_bound if self.lower_bound > 0 else math.inf

    @property
    def method_text(self) -> str:
        """``exact`` or ``anytime best-so-far, gap ≤ 1.3 %`` (the gap rounded up)."""
        if self.method != "anytime":
            return self.method
        gap = self.gap
        if math.isinf(gap):
            return "anytime best-so-far, gap unknown"
        return f"anytime best-so-far, gap ≤ {math.ceil(gap * 1000) / 10:.1f} %"

    @property
    def loads(self) -> int:
        return sum(step.load for step in self.steps)

    @property
    def load_time(self) -> float:
        return sum(self.models[s.model].load_time for s in self.steps if s.load and s.model)

    @property
    def capacity_text(self) -> str:
        return ", ".join(f"{d} {format_size(v)}" for d, v in sorted(self.capacity.items())) or "unbounded"

    def peak(self) -> dict[str, int]:
        """Highest planned use per device, counting prefetched models beside the running one."""
        peak: dict[str, int] = {}
        for step in self.steps:
            names = [*step.resident, *([step.prefetch] if step.prefetch else [])]
            for device, used in _usage(names, self.models).items():
                peak[device] = max(peak.get(device, 0), used)
        return peak

    def describe(self) -> list[str]:
        lines = []
        for step in self.steps:
            what = step.model or "(no model)"
            action = "load" if step.load else ("reuse" if step.model else "-")
            extra = []
            if step.prefetch:
                extra.append(f"prefetch {step.prefetch}")
            if step.unload_after:
                extra.append(f"then unload {', '.join(step.unload_after)}")
            tail = f" ({'; '.join(extra)})" if extra else ""
            lines.append(f"{step.index + 1}. {what}: {action}{tail}")
        lines.append(
            f"{self.loads} loads, {self.load_time:.1f}s of loading, {self.method_text} plan within {self.capacity_text}"
        )
        return lines


def _usage(names: Iterable[str], models: Mapping[str, PlanModel]) -> dict[str, int]:
    used: dict[str, int] = {}
    for name in names:
        for device, size in models[name].memory.items():
            used[device] = used.get(device, 0) + size
    return used


class _Fit:
    """Whether a set of models can be resident together: memory per device, groups, cap."""

    def __init__(self, models: Mapping[str, PlanModel], capacity: Mapping[str, int], max_models: int | None):
        self.models = models
        self.capacity = capacity
        self.max_models = max_models
        self._known: dict[frozenset[str], bool] = {}

    def __call__(self, names: frozenset[str]) -> bool:
        known = self._known.get(names)
        if known is None:
            known = self._known[names] = self._fits(names)
        return known

    def _fits(self, names: frozenset[str]) -> bool:
        if self.max_models is not None and len(names) > self.max_models:
            return False
        groups = [self.models[n].group for n in names if self.models[n].group]
        if len(groups) != len(set(groups)):
            return False
        used = _usage(names, self.models)
        return all(used[d] <= self.capacity[d] for d in used if d in self.capacity)


def plan_residency(
    sequence: Sequence[str | None],
    models: Mapping[str, PlanModel],
    capacity: Mapping[str, int],
    *,
    initial: Iterable[str] = (),
    max_models: int | None = None,
    prefetch: bool = True,
    time_budget: float = TIME_BUDGET,
    stop: Callable[[], bool] | None = None,
) -> ResidencyPlan:
    """The plan with the least total load time for ``sequence`` (None: a step with no model)
    that the search finds within ``time_budget`` seconds.

    ``capacity`` is what the chain may use per device (bytes); ``initial`` the chain's
    models that are resident already (free to reuse).  ``stop``, polled between search
    states, ends the search early (e.g. when the caller is cancelled).  The result's
    ``method`` is ``"exact"`` when the plan is proven optimal, else ``"anytime"`` with
    ``lower_bound``/``gap`` saying how far from the optimum it can be.  CPU-bound for up
    to ``time_budget``: run it in a worker thread from async code.  Raises ValueError for
    a negative or non-finite ``time_budget``.
    """
    if not math.isfinite(time_budget) or time_budget < 0:
        raise ValueError(f"time_budget must be a finite number of seconds >= 0, got {time_budget!r}")
    began = time.monotonic()
    deadline = began + time_budget
    fit = _Fit(models, capacity, max_models)
    start = frozenset(n for n in initial if n in models and n in set(sequence))
    if not fit(start):
        start = frozenset()
    distinct = {m for m in sequence if m is not None}
    path = None
    if len(distinct) <= EXACT_LIMIT:
        path = _exact(sequence, models, fit, start, began + time_budget / 10, stop)
    if path is not None:
        return _eager(
            sequence, models, capacity, path, start, fit if prefetch else None, "exact", None, began
        )
    found = search(
        residency_problem(sequence, models, capacity, start, max_models), deadline=deadline, stop=stop
    )
    method: Method = "exact" if found.proven else "anytime"
    return _eager(
        sequence,
        models,
        capacity,
        found.path,
        start,
        fit if prefetch else None,
        method,
        found.lower_bound,
        began,
    )


def residency_problem(
    sequence: Sequence[str | None],
    models: Mapping[str, PlanModel],
    capacity: Mapping[str, int],
    start: frozenset[str] = frozenset(),
    max_models: int | None = None,
) -> SearchProblem:
    """The chain as :func:`.search.search` takes it; ``start`` must fit."""
    names = {m for m in sequence if m is not None} | start
    fit = _Fit(models, capacity, max_models)
    demand = _demand(models, capacity, max_models)
    return SearchProblem(sequence, {n: models[n].load_time for n in names}, demand, fit, start)


def _demand(
    models: Mapping[str, PlanModel], capacity: Mapping[str, int], max_models: int | None
) -> dict[str, dict[str, float]]:
    """Each model's share of every bounded resource: a device's budget, an exclusive group
    (room for one), the model-count cap.  Feeds the search's lower bound only."""
    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        share: dict[str, float] = {}
        for device, size in model.memory.items():
            if device in capacity and size > 0:
                share[f"device:{device}"] = size / capacity[device] if capacity[device] > 0 else math.inf
        if model.group:
            share[f"group:{model.group}"] = 1.0
        if max_models is not None:
            share["count"] = 1.0 / max_models if max_models > 0 else math.inf
        out[name] = share
    return out


def _exact(
    sequence: Sequence[str | None],
    models: Mapping[str, PlanModel],
    fit: _Fit,
    start: frozenset[str],
    deadline: float = math.inf,
    stop: Callable[[], bool] | None = None,
) -> list[frozenset[str]] | None:
    """Lazy resident set during each step on a cheapest path, or None past the state limit,
    the ``deadline`` (a :func:`time.monotonic` instant) or ``stop()``."""
    layer: dict[frozenset[str], float] = {start: 0.0}
    parents: list[dict[frozenset[str], frozenset[str]]] = []
    seen = 0  # states expanded; small chains never look at the clock, so their plans are fixed
    for model in sequence:
        nxt: dict[frozenset[str], float] = {}
        back: dict[frozenset[str], frozenset[str]] = {}
        for state, cost in layer.items():
            seen += 1
            handover()  # run in a worker thread: the event loop's thread takes the GIL soon
            if seen > _UNTIMED_STATES and _past(deadline, stop):
                return None
            if model is None or model in state:
                options: Iterable[frozenset[str]] = (state,)
                step_cost = 0.0
            else:
                options = _admissions(state, model, fit)
                step_cost = models[model].load_time
            for option in options:
                total = cost + step_cost
                if option not in nxt or total < nxt[option]:
                    nxt[option], back[option] = total, state
        if len(nxt) > STATE_LIMIT or (seen > _UNTIMED_STATES and _past(deadline, stop)):
            return None
        layer = nxt
        parents.append(back)

    def rank(s: frozenset[str]) -> tuple[float, int, list[str]]:
        handover()  # up to STATE_LIMIT states
        return layer[s], sum(sum(models[n].memory.values()) for n in s), sorted(s)

    best = min(layer, key=rank)
    path = [best]
    for back in reversed(parents[1:]):
        path.append(back[path[-1]])
    path.reverse()
    return path


_UNTIMED_STATES = 256
"""States the exact search expands before it starts checking its deadline."""


def _past(deadline: float, stop: Callable[[], bool] | None) -> bool:
    return time.monotonic() > deadline or (stop is not None and stop())


def _admissions(state: frozenset[str], model: str, fit: _Fit) -> list[frozenset[str]]:
    """Every resident set after loading ``model`` from ``state`` with a minimal eviction."""
    grown = state | {model}
    if fit(grown):
        return [grown]
    if not fit(frozenset({model})):
        return [frozenset({model})]  # it never fits: the manager will refuse; plan it alone
    others = sorted(state)
    found: list[frozenset[str]] = []
    for size in range(1, len(others) + 1):
        for evicted in itertools.combinations(others, size):
            handover()  # up to 2^13 combinations a state
            option = grown - set(evicted)
            # minimal: no smaller eviction found earlier is contained in this one
            if fit(option) and not any(option < kept for kept in found):
                found.append(option)
    return found


def _eager(
    sequence: Sequence[str | None],
    models: Mapping[str, PlanModel],
    capacity: Mapping[str, int],
    path: Sequence[frozenset[str]],
    start: frozenset[str],
    fit: _Fit | None,
    method: Method,
    lower_bound: float | None,
    began: float,
) -> ResidencyPlan:
    """Turn a lazy path into unload-as-soon-as-useless steps with prefetch decisions."""
    n = len(sequence)

    def kept_until_next_use(name: str, i: int) -> bool:
        """After step ``i`` (-1: before the chain), does the lazy path keep ``name`` until it is used?"""
        for j in range(i + 1, n):
            if name not in path[j]:
                return False
            if sequence[j] == name:
                return True
        return False

    live: list[frozenset[str]] = []
    previous = frozenset(m for m in start if kept_until_next_use(m, -1))
    for i, model in enumerate(sequence):
        handover()  # O(steps²) on long chains, in the planner's worker thread
        now = set(previous)
        if model is not None:
            now.add(model)
        live.append(frozenset(now))
        previous = frozenset(m for m in now if kept_until_next_use(m, i))
    steps = []
    before = frozenset(m for m in start if kept_until_next_use(m, -1))
    for i, model in enumerate(sequence):
        handover()
        after = live[i + 1] if i + 1 < n else frozenset()
        carried = frozenset(m for m in live[i] if kept_until_next_use(m, i))
        nxt = sequence[i + 1] if i + 1 < n else None
        prefetch = None
        if fit is not None and nxt is not None and nxt not in carried and fit(live[i] | {nxt}):
            prefetch = nxt
        steps.append(
            PlannedStep(
                index=i,
                model=model,
                load=model is not None and model not in before,
                resident=tuple(sorted(live[i])),
                unload_after=tuple(sorted(live[i] - after)),
                prefetch=prefetch,
            )
        )
        before = carried  # a prefetched model still counts as a load of its own step
    plan = ResidencyPlan(tuple(steps), dict(models), dict(capacity), method, lower_bound)
    return replace(plan, search_s=time.monotonic() - began)


def plan_next_use(sequence: Sequence[str | None], models: Mapping[str, PlanModel]) -> ResidencyPlan:
    """The seeds' rule: after a step, keep its model only when the next step uses it too."""
    steps = []
    previous: str | None = None
    for i, model in enumerate(sequence):
        nxt = sequence[i + 1] if i + 1 < len(sequence) else None
        resident = (model,) if model else ()
        steps.append(
            PlannedStep(
                index=i,
                model=model,
                load=model is not None and model != previous,
                resident=resident,
                unload_after=() if model is None or model == nxt else resident,
            )
        )
        previous = model if model == nxt else None
    return ResidencyPlan(tuple(steps), dict(models), {}, "next-use")


def plan_always_unload(sequence: Sequence[str | None], models: Mapping[str, PlanModel]) -> ResidencyPlan:
    """No lifecycle thinking at all: load for every step, unload after it."""
    steps = [
        PlannedStep(i, m, m is not None, (m,) if m else (), (m,) if m else ()) for i, m in enumerate(sequence)
    ]
    return ResidencyPlan(tuple(steps), dict(models), {}, "always-unload")


__all__ = [
    "EXACT_LIMIT",
    "STATE_LIMIT",
    "TIME_BUDGET",
    "Method",
    "PlanModel",
    "PlannedStep",
    "ResidencyPlan",
    "plan_always_unload",
    "plan_next_use",
    "plan_residency",
    "residency_problem",
]
