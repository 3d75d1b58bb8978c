"""Eviction policy: which idle model goes first when room is needed.

Two policies order the planner's victims (``eviction`` in the manager's config):

* ``lru`` — least recently used first (every peer's rule: Ray Serve's
  ``@serve.multiplexed``, llama.cpp's router, Ollama);
* ``cost`` (the default) — a cost-aware approximation of Belady's rule.  Belady (1966)
  evicts what is needed furthest in the future; with sizes and costs, GreedyDual-Size
  (P. Cao, S. Irani, *Cost-Aware WWW Proxy Caching Algorithms*, USITS 1997) and
  GreedyDual-Size-Frequency (L. Cherkasova, HP Labs HPL-98-69, 1998) weigh an object by
  its cost per byte.  Here a model's worth is the reload seconds it saves per byte per
  request it is held until it is needed again:

      priority = load_s / (bytes × next_use)        (lowest goes first)

  ``load_s``: its measured load time (seconds); ``bytes``: what evicting it frees on the
  devices the candidate is short of; ``next_use``: requests until its next request,
  expected from its past gaps between requests (the reuse-distance features of LRB —
  Z. Song et al., *Learning Relaxed Belady for Content Distribution Network Caching*,
  NSDI 2020 — reduced to a conditional mean, :func:`expected_next_use`).  Frequency and
  ageing come from the gaps: an often-used model has short gaps, and only the last
  ``WINDOW`` gaps count.  A model never requested is worth 0; ties go to LRU, so with
  equal sizes and load times and no history (one request each) the policy *is* LRU.

:class:`Reuse` keeps the gaps: plain bookkeeping, updated by the core on every granted
lease; nothing here awaits or touches a runtime.  :class:`Successors` learns which model
tends to be asked for next, for the prefetch (``core/prefetch.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Mapping
from typing import Literal, Protocol, TypeVar

Eviction = Literal["cost", "lru"]
EVICTIONS: tuple[Eviction, ...] = ("cost", "lru")
WINDOW = 32  # gaps kept per model (chosen on benchmarks/bench_traces.py: 8, 16, 32 tried)
FOLLOWERS = 16  # successors kept per model for the prefetch's guess
STRAY = 1.5  # how far past LRU's estimate a model's expected next use may go (1, 1.25, 1.5, 2 tried)


class Victim(Protocol):
    """What the policy reads of a planner's resident (``planner.Resident``)."""

    @property
    def name(self) -> str: ...
    @property
    def memory(self) -> Mapping[str, int]: ...
    @property
    def last_used(self) -> float: ...
    @property
    def load_s(self) -> float: ...
    @property
    def next_use(self) -> float | None: ...


R = TypeVar("R", bound=Victim)


def priority(r: Victim, contended: Collection[str]) -> float:
    """What keeping ``r`` is worth: ``load_s / (bytes × next_use)`` — reload seconds saved
    per byte per request held (see the module docstring).  ``bytes`` are what ``r`` holds
    on the ``contended`` devices, or all it holds when none is named (a count cap), at
    least 1; a model never requested is worth 0.  Lower goes first."""
    if r.next_use is None:
        return 0.0
    held = sum(n for d, n in r.memory.items() if d in contended) if contended else sum(r.memory.values())
    return max(r.load_s, 0.0) / (max(held, 1) * r.next_use)


def eviction_order(pool: Iterable[R], policy: Eviction, contended: Collection[str] = ()) -> list[R]:
    """``pool`` in the order victims are taken: ``lru`` by ``last_used``; ``cost`` by
    :func:`priority` on the ``contended`` devices, ties by ``last_used``, then name."""
    if policy == "lru":
        return sorted(pool, key=lambda r: r.last_used)
    return sorted(pool, key=lambda r: (priority(r, contended), r.last_used, r.name))


class Reuse:
    """Past reuse gaps per model and the expected wait until its next request.

    ``request(name)`` counts one request (the ageing clock is the number of requests);
    ``next_use(name)`` is :func:`expected_next_use` over its last ``window`` gaps, or None
    for a model never requested.  Gaps survive eviction: how a model was used is known
    before it is loaded again."""

    __slots__ = ("_gaps", "_last", "requests", "window")

    def __init__(self, window: int = WINDOW):
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.window = window
        self.requests = 0  # requests counted so far: the ageing clock
        self._last: dict[str, int] = {}
        self._gaps: dict[str, deque[int]] = {}

    def request(self, name: str) -> None:
        last = self._last.get(name)
        if last is not None:
            gaps = self._gaps.get(name)
            if gaps is None:
                gaps = self._gaps[name] = deque(maxlen=self.window)
            gaps.append(self.requests - last)
        self._last[name] = self.requests
        self.requests += 1

    def next_use(self, name: str) -> float | None:
        last = self._last.get(name)
        if last is None:
            return None
        return expected_next_use(self._gaps.get(name, ()), self.requests - last)


class Successors:
    """First-order transitions between models in the request stream: which models were
    asked for right after each one, its last ``window`` times (older ones age out).

    A first-order Markov predictor of the next request, as in V. N. Padmanabhan and
    J. C. Mogul, *Using Predictive Prefetching to Improve World Wide Web Latency* (ACM
    SIGCOMM CCR 26(3), 1996): ``probability(a, b)`` is the share of ``a``'s last
    ``window`` followers that were ``b``.  ``request(name)`` is fed every counted request,
    like :class:`Reuse`; plain bookkeeping, nothing awaits."""

    __slots__ = ("_after", "_last", "window")

    def __init__(self, window: int = FOLLOWERS):
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.window = window
        self._last: str | None = None
        self._after: dict[str, deque[str]] = {}

    def request(self, name: str) -> None:
        if self._last is not None:
            after = self._after.get(self._last)
            if after is None:
                after = self._after[self._last] = deque(maxlen=self.window)
            after.append(name)
        self._last = name

    def observations(self, name: str) -> int:
        """How many of ``name``'s followers are counted (at most ``window``)."""
        return len(self._after.get(name, ()))

    def probability(self, name: str, follower: str) -> float:
        """The share (0–1) of ``name``'s counted followers that were ``follower``; 0 with none."""
        after = self._after.get(name)
        return after.count(follower) / len(after) if after else 0.0

    def likely(self, name: str, min_probability: float, min_observations: int) -> tuple[str, float] | None:
        """The likeliest model asked for after ``name`` and its probability, or None when
        ``name`` has fewer than ``min_observations`` followers counted or no follower's
        probability reaches ``min_probability``.  Ties go to the most recent follower.  It
        may be ``name`` itself (it is asked for again)."""
        after = self._after.get(name)
        if not after or len(after) < min_observations:
            return None
        counts: dict[str, int] = {}
        for follower in after:  # oldest first: a later follower wins a tie below
            counts[follower] = counts.get(follower, 0) + 1
        recency = {follower: i for i, follower in enumerate(after)}
        best = max(counts, key=lambda f: (counts[f], recency[f]))
        p = counts[best] / len(after)
        return (best, p) if p >= min_probability else None


def expected_next_use(gaps: Iterable[int], since: int) -> float:
    """Requests until the next request of a model last requested ``since`` requests ago,
    given its past gaps between requests: ``E[g - since | g > since]`` over the gaps (LRB's
    reuse-distance features, reduced to their conditional mean), or ``since`` itself when
    no gap was that long (it is overdue: as long again is expected — an episode that ended,
    a model no longer used); at most ``STRAY × since``, at least 0.5.

    ``since`` alone is LRU's estimate.  The cap keeps the policy near LRU where the gaps
    mislead (a model whose history mixes short gaps inside an episode with long ones between
    episodes); it still lets a model come up *sooner* than LRU thinks, which is what beats
    LRU on loops.  Measured in ``benchmarks/bench_traces.py`` over 6 seeds: uncapped, the
    planner-between-tools trace took up to 31 % more load-seconds than LRU; with the cap
    at most 4 %."""
    later = [g - since for g in gaps if g > since]
    estimate = sum(later) / len(later) if later else float(since)
    return max(min(estimate, STRAY * since), 0.5)


__all__ = [
    "EVICTIONS",
    "FOLLOWERS",
    "STRAY",
    "WINDOW",
    "Eviction",
    "Reuse",
    "Successors",
    "Victim",
    "eviction_order",
    "expected_next_use",
    "priority",
]
