"""Anytime residency search: beam searches and an integer programme (HiGHS), bounded below.

The problem is offline *generalized caching* in the fault model: each gap between two uses
of a model is an interval, and keeping the model resident through it saves one load of
that model; at every step the kept intervals plus the step's own model must fit every
budget.  With unequal sizes this is NP-hard (Bar-Noy, Bar-Yehuda, Freund, Naor, Schieber,
"A unified approach to approximating resource allocation and scheduling", JACM 48(5),
2001, which casts it as this interval packing), so the search is *anytime*:

- **The integer programme.**  The interval packing itself — keep each interval or not,
  every step within every budget share, most load seconds saved — goes to HiGHS's branch
  and bound (through SciPy's ``milp``) after the first, greedy beam run below, for up to
  ``_MILP_SHARE`` of the time left (in slices of ``_MILP_SLICE``, 2×, 4×, … seconds when
  there is a ``stop`` to poll: a cancelled plan waits for the slice under way, within the
  default 200 ms budget at most 150 ms, with a budget of minutes up to half of it).  It
  proves most chains of 20 models × 200 steps optimal in 10–170 ms, where the beam search
  alone stopped at its budget with a 5–20 % gap; its dual bound is a lower bound
  whenever it stops.  HiGHS runs without the GIL, so the event loop keeps its
  pace.  ``demand`` may be looser than ``fit`` (``fit`` is the authority), so a solution
  is used only if every step's set passes ``fit``.  Without SciPy (the ``chain`` extra)
  the beam search has all the time.
- **Upper bound.** Beam searches over resident sets, step by step, with widths 1, 2, 4, …
  until the deadline (the first, width 1, runs to its end once begun: a greedy plan is
  always there, at the price of overrunning the budget by one pass on huge chains — 60
  ms at 60 models × 1,000 steps here).  A state is a resident set; a load that does not
  fit tries every minimal eviction (as the exact dynamic programme does), and states are
  ranked by ``f = g + h``: load seconds so far plus the lower bound below on what is
  still to come.
  A run that never trims a layer explored every state the bound could not rule out, so
  its best plan is optimal.
- **Lower bound.** Lagrangian relaxation of the per-step capacity constraints (Fisher,
  "The Lagrangian relaxation method for solving integer programming problems", Management
  Science 27(1), 1981): with a price ``λ[t][r]`` per step and resource, each interval is
  kept alone iff its load time exceeds the memory rent over its span, which bounds the
  seconds any plan can save; the prices come from subgradient optimisation with Polyak
  steps (Held, Wolfe, Crowder, Mathematical Programming 6, 1974), for a tenth of the
  budget.  A trimmed beam run adds a second bound: no plan beats the smallest ``f`` it
  trimmed away; the integer programme's dual bound a third.

Everything here is pure and synchronous; :func:`search` checks its deadline and ``stop``
between states (and before and after the integer programme, which cannot be interrupted:
hence its slice) so a caller runs it in a worker thread; its inner loops offer the GIL to
the event loop's thread every half millisecond (:func:`.gil.handover`).
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .gil import handover

_EPS = 1e-9
_OPTIONS_PER_WIDTH = 16
"""Eviction sets one load tries per unit of beam width before the run stops being exhaustive."""
_PRICE_ROUNDS = 300
"""Most subgradient steps on the prices."""
_MILP_SHARE = 0.75
"""Share of the budget the integer programme may take; the beam search has the rest."""
_MILP_SLICE = 1.0
"""Seconds of the first HiGHS run when there is a ``stop`` to poll (then 2, 4, ...): it
cannot be stopped before its time limit, and ``stop`` is polled between runs."""


@dataclass(frozen=True, slots=True)
class SearchProblem:
    """A chain as the search sees it.

    ``demand[m][r]`` is model ``m``'s share of resource ``r`` (1.0: all of it; a device's
    bytes over its budget, 1 for an exclusive group of capacity 1, ``1/max_models`` for the
    model-count cap).  ``fit`` decides whether a set may be resident together and is the
    authority; ``demand`` only feeds the bound.  ``start``: resident before step 0.
    """

    sequence: Sequence[str | None]
    load_time: Mapping[str, float]
    demand: Mapping[str, Mapping[str, float]]
    fit: Callable[[frozenset[str]], bool]
    start: frozenset[str]


@dataclass(frozen=True, slots=True)
class SearchResult:
    """``path[t]``: the resident set during step ``t``; ``cost`` its load seconds, and no
    plan costs less than ``lower_bound``; ``proven``: ``cost`` is the optimum."""

    path: list[frozenset[str]]
    cost: float
    lower_bound: float
    proven: bool
    widest_beam: int


class _Stopped(Exception):
    pass


def path_cost(
    sequence: Sequence[str | None],
    load_time: Mapping[str, float],
    start: frozenset[str],
    path: Sequence[frozenset[str]],
) -> float:
    """Load seconds of a lazy path: a step loads its model when the previous set lacks it."""
    total, before = 0.0, start
    for model, now in zip(sequence, path, strict=True):
        if model is not None and model not in before:
            total += load_time[model]
        before = now
    return total


def belady_path(problem: SearchProblem) -> list[frozenset[str]]:
    """Belady with costs: on a load that does not fit, evict what is needed farthest ahead
    (cheap reloads first).  Optimal with equal sizes and costs; a start for the search."""
    seq = problem.sequence
    state = set(problem.start)
    nxt = _next_uses(seq)
    path: list[frozenset[str]] = []
    for i, model in enumerate(seq):
        handover()
        if model is not None and model not in state:
            state.add(model)
            while not problem.fit(frozenset(state)) and len(state) > 1:
                victim = max(
                    (n for n in state if n != model),
                    key=lambda n: (nxt[i].get(n, math.inf), -problem.load_time[n], n),
                )
                state.discard(victim)
        path.append(frozenset(state))
    return path


def _next_uses(seq: Sequence[str | None]) -> list[dict[str, int]]:
    """``out[i][m]``: the first step after ``i`` that uses ``m``."""
    out: list[dict[str, int]] = [{} for _ in seq]
    ahead: dict[str, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        out[i] = dict(ahead)
        model = seq[i]
        if model is not None:
            ahead[model] = i
    return out


class _Search:
    def __init__(self, problem: SearchProblem, deadline: float, stop: Callable[[], bool] | None):
        self.p = problem
        self.deadline = deadline
        self.stop = stop
        self.ticks = 0
        self.patient = False  # a run that ignores the deadline (only ``stop`` ends it)
        seq = problem.sequence
        self.names = sorted({m for m in seq if m is not None} | set(problem.start))
        self.index = {n: i for i, n in enumerate(self.names)}
        self.cost = [problem.load_time[n] for n in self.names]
        self.T = len(seq)
        self.steps = [None if m is None else self.index[m] for m in seq]
        self.start = self._mask(problem.start)
        self._fit_cache: dict[int, bool] = {}
        alive, mask = [0] * (self.T + 1), 0
        for t in range(self.T - 1, -1, -1):
            step = self.steps[t]
            if step is not None:
                mask |= 1 << step
            alive[t] = mask
        self.alive = alive  # models used at step t or later
        self._bound_tables()

    # -- helpers ---------------------------------------------------------------------------

    def _mask(self, names: frozenset[str]) -> int:
        return sum(1 << self.index[n] for n in names)

    def _names(self, mask: int) -> frozenset[str]:
        return frozenset(self.names[i] for i in _bits(mask))

    def fits(self, mask: int) -> bool:
        known = self._fit_cache.get(mask)
        if known is None:
            known = self._fit_cache[mask] = self.p.fit(self._names(mask))
        return known

    def check(self) -> None:
        self.ticks += 1
        handover()  # the event loop's thread gets the GIL within half a millisecond
        if self.ticks % 32 == 0:
            late = not self.patient and time.monotonic() > self.deadline
            if late or (self.stop is not None and self.stop()):
                raise _Stopped

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline or (self.stop is not None and self.stop())

    # -- the Lagrangian bound ---------------------------------------------------------------

    def _bound_tables(self) -> None:
        """Resources, per-step capacity left by the step's own model, and the intervals.

        Lists are resource-major (``x[r][t]``) so that the bound's inner loops are
        ``accumulate``/``map`` over whole rows."""
        p, T, M = self.p, self.T, len(self.names)
        resources = sorted({r for d in p.demand.values() for r, v in d.items() if v > 0})
        self.R = R = len(resources)
        self.dem: list[list[tuple[int, float]]] = [
            [
                (r, float(p.demand[n][res]))
                for r, res in enumerate(resources)
                if p.demand.get(n, {}).get(res, 0) > 0
            ]
            for n in self.names
        ]
        # constrained steps: the model fits alone; blocked: it never does (and is planned alone);
        # a step without a model only ever holds a subset of the set before it
        self.on = [0.0] * T
        self.cap = [[0.0] * T for _ in range(R)]
        blocked = [False] * T
        for t, step in enumerate(self.steps):
            if step is None:
                continue
            if self.fits(1 << step):
                self.on[t] = 1.0
                for r in range(R):
                    self.cap[r][t] = 1.0
                for r, d in self.dem[step]:
                    self.cap[r][t] = 1.0 - d
            else:
                blocked[t] = True
        # bad_prefix[m][i]: steps before i where m cannot stay resident beside the step's model
        self.bad_prefix: list[list[int]] = []
        for m in range(M):
            handover()
            no_room = [int(b) for b in blocked]
            for r, d in self.dem[m]:
                row, limit = self.cap[r], d - _EPS
                no_room = [
                    x or int(on > 0 and step != m and c < limit)
                    for x, on, step, c in zip(no_room, self.on, self.steps, row, strict=True)
                ]
            self.bad_prefix.append([0, *itertools.accumulate(no_room)])
        # intervals (s + 1, e, load seconds, model): keeping the model from step s through
        # step e saves a load; s = -1 for a model resident before the chain
        uses: dict[int, list[int]] = {}
        for t, step in enumerate(self.steps):
            if step is not None:
                uses.setdefault(step, []).append(t)
        items: list[tuple[int, int, float, int]] = []
        for m, at in uses.items():
            if self.start >> m & 1:
                at = [-1, *at]
            for s, e in itertools.pairwise(at):
                if self.bad_prefix[m][e] - self.bad_prefix[m][s + 1] == 0:
                    items.append((s + 1, e, self.cost[m], m))
        self.items = items
        costs = [0.0 if step is None else self.cost[step] for step in self.steps]
        self.base = sum(costs)
        self.future = [*reversed(list(itertools.accumulate(reversed(costs), initial=0.0)))]
        self.lam: list[list[float]] = [[0.0] * T for _ in range(R)]
        self._set_prices(self.lam)

    def _prefix(self, lam: list[list[float]]) -> list[list[float]]:
        """q[r][i]: the sum of lam[r][t] over t < i."""
        return [list(itertools.accumulate(row, initial=0.0)) for row in lam]

    def _dual(self, lam: list[list[float]]) -> tuple[float, list[list[float]]]:
        """The relaxation's bound on seconds saved, and its subgradient."""
        q = self._prefix(lam)
        total = sum(sum(map(operator.mul, lam[r], self.cap[r])) for r in range(self.R))
        diff = [[0.0] * (self.T + 1) for _ in range(self.R)]
        dem = self.dem
        for s1, e, cost, m in self.items:
            dm = dem[m]
            gain = cost - sum(d * (q[r][e] - q[r][s1]) for r, d in dm)
            if gain > 0:
                total += gain
                for r, d in dm:
                    diff[r][s1] += d
                    diff[r][e] -= d
        grad = [
            [
                (c - u) * on
                for c, u, on in zip(self.cap[r], itertools.accumulate(diff[r]), self.on, strict=False)
            ]
            for r in range(self.R)
        ]
        return total, grad

    # -- the integer programme --------------------------------------------------------------

    def integer_programme(
        self, seconds: float
    ) -> tuple[list[frozenset[str]] | None, float, float, bool] | None:
        """The relaxation's intervals as a 0/1 programme — keep interval ``i`` or not, at
        most each step's capacity on every resource, most load seconds saved — solved by
        HiGHS (Q. Huangfu and J. A. J. Hall, *Parallelizing the dual revised simplex
        method*, Math. Prog. Comp. 10, 2018; through :func:`scipy.optimize.milp`) for at
        most ``seconds`` (HiGHS cannot poll ``stop``: the caller gives it slices).  Returns
        ``(path, its load seconds, lower bound, optimal)``:
        ``path`` is None when HiGHS found no solution in time or its solution does not
        pass ``fit`` (the authority: ``demand`` may be looser); the bound holds either way.
        None without SciPy (the ``chain`` extra), or with nothing to keep."""
        highs = _highs()
        if highs is None:
            return None
        np, Bounds, LinearConstraint, milp, coo_matrix = highs
        began = time.monotonic()
        items = self.items
        if not items or seconds <= 0:
            return None
        rows: dict[tuple[int, int], int] = {}
        at: list[int] = []
        var: list[int] = []
        share: list[float] = []
        for j, (s1, e, _, m) in enumerate(items):
            handover()
            for r, d in self.dem[m]:
                for t in range(s1, e):
                    if self.on[t] > 0:
                        at.append(rows.setdefault((r, t), len(rows)))
                        var.append(j)
                        share.append(d)
        saved = np.array([cost for _, _, cost, _ in items])
        constraints = []
        if rows:
            matrix = coo_matrix((share, (at, var)), shape=(len(rows), len(items))).tocsr()
            room = np.array([self.cap[r][t] for r, t in rows]) + 1e-9
            constraints.append(LinearConstraint(matrix, -np.inf, room))
        seconds -= time.monotonic() - began  # building the programme counts
        if seconds <= 0:
            return None
        result = milp(
            -saved,
            constraints=constraints,
            integrality=np.ones(len(items)),
            bounds=Bounds(0, 1),
            # optimal, not within 0.01 %; no presolve: HiGHS 1.x (SciPy 1.17) printf()s a debug
            # line to stdout when it maps a presolved solution back ("...tmpSolver.run();"),
            # which would land in `modelmora plan --json`; as fast on these programmes
            options={"time_limit": seconds, "mip_rel_gap": 0.0, "presolve": False},
        )
        dual = getattr(result, "mip_dual_bound", None)
        bound = self.base + dual if dual is not None and math.isfinite(dual) else 0.0
        if result.x is None:
            return None, 0.0, max(bound, 0.0), False
        kept: list[set[str]] = [set() for _ in range(self.T)]
        for keep, (s1, e, _, m) in zip(result.x, items, strict=True):
            handover()
            if keep > 0.5:
                for t in range(s1, e):
                    kept[t].add(self.names[m])
        path = [
            frozenset(kept[t] | ({self.names[step]} if step is not None else set()))
            for t, step in enumerate(self.steps)
        ]
        for names in path:
            handover()
            if not self.fits(self._mask(names)):
                return None, 0.0, max(bound, 0.0), False
        cost = path_cost(self.p.sequence, self.p.load_time, self.p.start, path)
        optimal = result.status == 0 and cost <= bound + 1e-6 * max(1.0, cost)
        return path, cost, max(bound, 0.0), optimal

    def optimise_prices(self, best_saving: float, until: float) -> float:
        """Subgradient descent on the prices; returns the lower bound on load seconds."""
        lam = self.lam
        best, best_lam = math.inf, lam
        mu, stall = 2.0, 0
        for _ in range(_PRICE_ROUNDS):
            handover()
            if time.monotonic() > until or (self.stop is not None and self.stop()):
                break
            value, grad = self._dual(lam)
            if value < best - 1e-12:
                best, best_lam, stall = value, lam, 0
            else:
                stall += 1
                if stall >= 5:
                    mu, stall = mu / 2, 0
            if best <= best_saving + _EPS or mu < 1e-3:
                break
            norm = sum(
                g * g
                for row, grow in zip(lam, grad, strict=True)
                for a, g in zip(row, grow, strict=True)
                if a > 0 or g < 0
            )
            if norm <= 0:
                break
            step = mu * max(value - best_saving, _EPS) / norm
            lam = [
                [max(0.0, a - step * g) for a, g in zip(row, grow, strict=True)]
                for row, grow in zip(lam, grad, strict=True)
            ]
        self.lam = best_lam
        self._set_prices(best_lam)
        return self.base - best if best < math.inf else 0.0

    def _set_prices(self, lam: list[list[float]]) -> None:
        """Tables for h(state, i) = ahead[i] - sum of keep[i][m] over m in state, where
        i = t + 1 for the set resident during step t (i = 0: before the chain)."""
        T, q = self.T, self._prefix(lam)
        rent = [0.0] * T
        for r in range(self.R):
            rent = [x + a * c for x, a, c in zip(rent, lam[r], self.cap[r], strict=True)]
        rent_after = [*reversed(list(itertools.accumulate(reversed(rent), initial=0.0)))]
        # rent of each model's memory: price[m][i] = sum over t < i of its share times lam
        price = [[0.0] * (T + 1) for _ in self.names]
        for m, dm in enumerate(self.dem):
            handover()
            for r, d in dm:
                price[m] = [x + d * y for x, y in zip(price[m], q[r], strict=True)]
        starting = [0.0] * (T + 2)  # relaxed gains of the intervals that start at step i - 1
        for s1, e, cost, m in self.items:
            starting[s1] += max(0.0, cost - (price[m][e] - price[m][s1]))
        # gains of the intervals starting at step i or later
        gains_after = [*reversed(list(itertools.accumulate(reversed(starting[1:]), initial=0.0)))]
        self.ahead = [self.future[i] - rent_after[i] - gains_after[i] for i in range(T + 1)]
        following = [-1] * len(self.names)
        rows: list[list[float]] = [[]] * (T + 1)
        for i in range(T, -1, -1):  # following: each model's first use at step i or later
            handover()
            s1 = i  # an interval kept from step i - 1 covers steps i .. e - 1
            row = [0.0] * len(self.names)
            for m, e in enumerate(following):
                if e >= 0 and self.bad_prefix[m][e] == self.bad_prefix[m][s1]:
                    row[m] = max(0.0, self.cost[m] - (price[m][e] - price[m][s1]))
            rows[i] = row
            if i > 0:
                step = self.steps[i - 1]
                if step is not None:
                    following[step] = i - 1
        self.keep = rows

    def h(self, mask: int, i: int) -> float:
        """Lower bound on the load seconds after step i - 1 with ``mask`` resident during it."""
        row = self.keep[i]
        return self.ahead[i] - sum(row[m] for m in _bits(mask))

    # -- the beam ---------------------------------------------------------------------------

    def admissions(self, mask: int, m: int, i: int, limit: int) -> tuple[list[int], bool]:
        """Resident sets after loading m with a minimal eviction: every one, or (False) the
        first ``limit`` tried, smallest evictions of the least worth keeping first, plus
        two greedy ones (by worth, and by worth per share of memory)."""
        grown = mask | 1 << m
        if self.fits(grown):
            return [grown], True
        if not self.fits(1 << m):
            return [1 << m], True
        row = self.keep[i]
        others = sorted(_bits(mask), key=lambda n: (row[n], n))  # least worth keeping first
        found: list[int] = []
        per_share = sorted(others, key=lambda n: (row[n] / (sum(d for _, d in self.dem[n]) or _EPS), n))
        for order in (others, per_share):
            option = grown
            for n in order:
                if self.fits(option):
                    break
                option &= ~(1 << n)
            for n in reversed(order):  # minimal: give back what is not needed after all
                if not option >> n & 1 and mask >> n & 1 and self.fits(option | 1 << n):
                    option |= 1 << n
            if self.fits(option) and option not in found:
                found.append(option)
        tried = 0
        for size in range(1, len(others) + 1):
            for evicted in itertools.combinations(others, size):
                handover()
                tried += 1
                if tried > limit:
                    return found, False
                option = grown & ~sum(1 << n for n in evicted)
                if (
                    self.fits(option)
                    and option not in found
                    and not any(option | kept == kept for kept in found)
                ):
                    found.append(option)
        return found, True

    def beam(self, width: int, upper: float) -> tuple[float, list[frozenset[str]] | None, float, bool]:
        """One beam run of ``width`` states per step, pruning what cannot beat ``upper``:
        (cost, path or None if nothing beat ``upper``, a lower bound on the optimum, whether
        the run was exhaustive, i.e. its plan, or ``upper``'s, is optimal)."""
        layer: dict[int, float] = {self.start: 0.0}
        parents: list[dict[int, int]] = []
        trimmed_f, exhaustive = math.inf, True
        for t, m in enumerate(self.steps):
            nxt: dict[int, float] = {}
            back: dict[int, int] = {}
            score: dict[int, float] = {}
            for mask, g in layer.items():
                self.check()
                here = mask & self.alive[t]
                if m is None or here >> m & 1:
                    options, cost = [here], 0.0
                else:
                    options, whole = self.admissions(here, m, t + 1, _OPTIONS_PER_WIDTH * width)
                    cost = self.cost[m]
                    if not whole:  # the options left out keep no more than everything
                        exhaustive = False
                        trimmed_f = min(trimmed_f, g + cost + self.h(here | 1 << m, t + 1))
                total = g + cost
                for option in options:
                    if option in nxt and nxt[option] <= total:
                        continue
                    f = total + self.h(option, t + 1)
                    if f >= upper - _EPS:
                        continue
                    nxt[option], back[option], score[option] = total, mask, f
            if len(nxt) > width:
                ranked = sorted(nxt, key=lambda k: (score[k], nxt[k]))
                trimmed_f = min(trimmed_f, score[ranked[width]])
                exhaustive = False
                nxt = {k: nxt[k] for k in ranked[:width]}
            if not nxt:
                break
            layer = nxt
            parents.append(back)
        bound = min(trimmed_f, upper)
        if len(parents) < self.T or not layer:
            return math.inf, None, bound, exhaustive
        best = min(layer, key=lambda k: (layer[k], k))
        path = [best]
        for back in reversed(parents[1:]):
            path.append(back[path[-1]])
        path.reverse()
        found = layer[best]
        return (
            found,
            [self._names(k) for k in path],
            min(bound, found),
            exhaustive,
        )


@functools.cache
def _highs() -> tuple[Any, ...] | None:
    """NumPy and SciPy's HiGHS interface, imported once (about 0.5 s the first time), or
    None without SciPy."""
    try:
        import numpy as np
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix
    except ImportError:
        return None
    return np, Bounds, LinearConstraint, milp, coo_matrix


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def search(
    problem: SearchProblem,
    *,
    deadline: float,
    stop: Callable[[], bool] | None = None,
    incumbent: Sequence[frozenset[str]] | None = None,
    max_width: int | None = None,
    integer_programme: bool = True,
) -> SearchResult:
    """The cheapest plan found by ``deadline`` (a :func:`time.monotonic` instant) or until
    ``stop()`` returns True, with a lower bound on the optimum.

    ``incumbent`` (a lazy path) starts the search; without it, :func:`belady_path` does.
    ``max_width`` caps the beam's widening; ``integer_programme=False`` skips HiGHS (the
    beam search alone, as without SciPy): with both, a fixed amount of work, for tests
    and benchmarks.  Returns as soon as the plan is proven optimal.  Load seconds
    throughout.
    """
    seq, start = problem.sequence, problem.start
    if integer_programme:
        began = time.monotonic()
        _highs()  # imported once per process: that time does not count against the deadline
        deadline += time.monotonic() - began
    best_path = list(incumbent) if incumbent is not None else belady_path(problem)
    best = path_cost(seq, problem.load_time, start, best_path)
    s = _Search(problem, deadline, stop)
    # a tenth of the time for the prices: their bound guides the beam and proves easy chains
    now = time.monotonic()
    lower = s.optimise_prices(s.base - best, now + max(0.0, deadline - now) / 10)
    width, widest, proven = 1, 0, lower >= best - _EPS
    while not proven and not s.out_of_time() and (max_width is None or width <= max_width):
        s.patient = width == 1  # the greedy run, once started, ends: a plan at least that good
        try:
            found, path, bound, exhaustive = s.beam(width, best)
        except _Stopped:
            break
        finally:
            s.patient = False
        widest = width
        if path is not None and found < best - _EPS:
            best, best_path = found, path
        if exhaustive:
            proven = True
        else:
            lower = max(lower, bound)
        proven = proven or lower >= best - _EPS
        if width == 1 and integer_programme and not proven and not s.out_of_time():
            # after one greedy beam (a good plan at once, even on chains too large for the
            # rest), the integer programme: HiGHS proves most chains of 20 models x 200
            # steps optimal within the default budget, without the GIL.  With a ``stop`` to
            # poll, in slices of 1, 2, 4 ... s (each run starts afresh: at most twice the
            # work), so a cancelled plan waits for the slice under way, not the whole budget
            until = time.monotonic() + _MILP_SHARE * (deadline - time.monotonic())
            piece = _MILP_SLICE
            while (left := until - time.monotonic()) > 0 and not s.out_of_time():
                began = time.monotonic()
                solved = s.integer_programme(min(left, piece) if stop is not None else left)
                if solved is None:
                    break
                path, cost, bound, optimal = solved
                if path is not None and cost < best - _EPS:
                    best, best_path = cost, path
                lower = max(lower, bound)
                proven = (optimal and path is not None and cost <= best + _EPS) or lower >= best - _EPS
                if proven or stop is None or time.monotonic() - began < 0.9 * min(left, piece):
                    break  # proven, the whole time was given, or HiGHS ended before its limit
                piece *= 2
        width *= 2
    return SearchResult(best_path, best, best if proven else min(lower, best), proven, widest)


__all__ = ["SearchProblem", "SearchResult", "belady_path", "path_cost", "search"]
