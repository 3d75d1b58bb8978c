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

  The expected next use comes in three kinds: *bounded* near LRU's (where a model's gaps
  mislead: short ones inside an agent's episode, long ones between episodes), *unbounded*
  (a loop longer than the room: LRU evicts exactly the model needed next, Belady the one
  just used) and *frequency* (the decayed mean interval, recency ignored: what requests
  drawn independently call for — GreedyDual-Size-Frequency's F).  Which one is trusted is
  decided by a set duel of three shadow caches on the request stream (:class:`Reuse`,
  :class:`Shadow`).

``load_s`` is measured on a machine that does other work, so one load says little: the
three equal GGUFs of ``benchmarks/bench_llamacpp_router.py`` measured 0.05–1.54 s a load
on a busy 2-core box, and a policy fed the last load kept whichever loaded slowly last
time (27–31 loads where LRU needs 25).  The policy is made robust three ways:

* the median of the last ``LOAD_SAMPLES`` loads, not the last one — the median ignores
  up to half its samples however far off they are (breakdown point ½; F. R. Hampel,
  *The Influence Curve and Its Role in Robust Estimation*, JASA 69, 1974; P. J. Huber and
  E. M. Ronchetti, *Robust Statistics*, 2nd ed., Wiley 2009, §3);
* models of the same size (within ``SAME_SIZE``) on the same provider whose measured
  loads do not tell them apart (medians within a factor ``SAME_LOAD``, or overlapping
  ranges) share one pool of samples: a runtime's load time is the bytes it reads and places over the bandwidth of
  where they come from (the load-time model of ServerlessLLM — Y. Fu et al.,
  *ServerlessLLM: Low-Latency Serverless Inference for Large Language Models*, OSDI 2024,
  §5), so what tells equal-size models apart there is noise, not the model.  With equal
  sizes on one provider and noise within ±1/3 every estimate is the same number, and the
  policy orders by expected next use alone (LRU where the gaps tell nothing); a model
  that really loads much slower (2 s against 40 s) keeps its own estimate;
* the cheapest to lose goes before LRU's choice only when it is cheaper even with both
  load times at the far ends of their measured ranges, a distribution-free confidence
  interval for each median (:func:`significantly_cheaper`); otherwise LRU breaks the tie.
  Where load times are known exactly the ranges are points and the order is the plain
  cost order.

:class:`Reuse` keeps the gaps: plain bookkeeping, updated by the core on every granted
lease; nothing here awaits or touches a runtime.  :class:`Successors` learns which model
tends to be asked for next, for the prefetch (``core/prefetch.py``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from statistics import median
from typing import Literal, NamedTuple, Protocol, TypeVar

Eviction = Literal["cost", "lru"]
EVICTIONS: tuple[Eviction, ...] = ("cost", "lru")
NextUseEstimate = Literal["bounded", "unbounded", "frequency"]
NEXT_USE_ESTIMATES: tuple[NextUseEstimate, ...] = ("bounded", "unbounded", "frequency")
WINDOW = 32  # gaps kept per model (chosen on benchmarks/bench_traces.py: 8, 16, 32 tried)
FOLLOWERS = 16  # successors kept per model for the prefetch's guess
STRAY = 1.5  # how far past LRU's estimate a model's expected next use may go (1, 1.25, 1.5, 2 tried)
LOAD_SAMPLES = 5  # measured loads kept per model for its load-time estimate (3, 5, 8 tried)
SAME_SIZE = 0.1  # models whose bytes differ by at most this share pool their load times
SAME_LOAD = 2.0  # ... when their median loads are within this factor (noise up to ±1/3)
HALF_LIFE = 100  # requests over which a shadow cache's reload seconds decay by half
DECAY = 0.5 ** (1 / HALF_LIFE)
SWITCH_LOADS = 3.0  # the unbounded estimate is followed once its shadow reloaded this many mean loads less


class Measured(NamedTuple):
    """What the core measured of one model's loads (``load_estimate``'s input)."""

    provider: str
    bytes: int  # its measured footprint, all devices
    seconds: Sequence[float]  # its last ``LOAD_SAMPLES`` loads, oldest first


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
    @property
    def load_bounds(self) -> tuple[float, float] | None: ...


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
    :func:`priority` on the ``contended`` devices, ties by ``last_used``, then name — except
    that the cheapest to lose goes before LRU's choice only when it is *significantly*
    cheaper (:func:`significantly_cheaper`); else LRU's choice goes first."""
    by_lru = sorted(pool, key=lambda r: r.last_used)
    if policy == "lru":
        return by_lru
    by_cost = sorted(by_lru, key=lambda r: (priority(r, contended), r.last_used, r.name))
    out: list[R] = []
    taken: set[int] = set()
    while len(out) < len(by_lru):
        cheapest = next(r for r in by_cost if id(r) not in taken)
        oldest = next(r for r in by_lru if id(r) not in taken)
        pick = cheapest if significantly_cheaper(cheapest, oldest, contended) else oldest
        out.append(pick)
        taken.add(id(pick))
    return out


def first_victim(pool: Sequence[R], contended: Collection[str] = ()) -> R:
    """``eviction_order(pool, "cost", contended)[0]`` in one pass (O(len(pool)) rather than
    the whole order): the cheapest to lose if significantly cheaper than the least recently
    used, else that one.  Raises ValueError on an empty pool."""
    if not pool:
        raise ValueError("no victim in an empty pool")
    oldest = min(pool, key=lambda r: r.last_used)  # the first of equals, as a stable sort
    cheapest = min(pool, key=lambda r: (priority(r, contended), r.last_used, r.name))
    return cheapest if significantly_cheaper(cheapest, oldest, contended) else oldest


def significantly_cheaper(r: Victim, other: Victim, contended: Collection[str] = ()) -> bool:
    """Whether losing ``r`` costs less than losing ``other`` even at the far ends of what
    their load times' measurements allow: ``r``'s priority with its load time at the top of
    its bounds below ``other``'s with its at the bottom (:func:`load_estimate`; a model with
    no bounds — one load measured, or none — counts at its estimate).  With every load time
    known exactly, or both estimated from the same pool of loads (equal models: the error,
    whatever it is, is the same on both sides), this is ``priority(r) < priority(other)``."""
    if r is other:
        return True
    if r.load_s == other.load_s:
        return priority(r, contended) < priority(other, contended)
    high = r.load_bounds[1] / max(r.load_s, 1e-9) if r.load_bounds else 1.0
    low = other.load_bounds[0] / max(other.load_s, 1e-9) if other.load_bounds else 1.0
    return priority(r, contended) * high < priority(other, contended) * low


class Cost(NamedTuple):
    """What holding one model costs a cache: its footprint and its reload time."""

    memory: Mapping[str, int]  # bytes per device
    load_s: float  # seconds, the core's estimate (:func:`load_estimate`)


class Room(NamedTuple):
    """The room a cache has: bytes per device, and at most ``max_loaded`` models (None: no cap)."""

    budgets: Mapping[str, int]
    max_loaded: int | None = None


class _Ghost(NamedTuple):
    """A model in a :class:`Shadow` cache, as the policy reads it (a :class:`Victim`)."""

    name: str
    memory: Mapping[str, int]
    last_used: float
    load_s: float
    next_use: float | None
    load_bounds: tuple[float, float] | None = None


class Shadow:
    """One next-use estimator's cache, replayed on the request stream (a ghost cache).

    Every counted request with a cost is replayed through it: a model not in it is
    "loaded" (its reload seconds are added to :meth:`cost`) and models are evicted by the
    ``cost`` rule with this estimator until it fits ``Room``.  :meth:`cost` decays by half
    every ``HALF_LIFE`` counted requests, those without a cost included (requests the
    manager counts while it has no budgets, or for a model it does not hold), so it weighs
    the recent stream.  Leases, pins and other callers are not modelled: the shadow
    answers "which estimator would have reloaded less on this stream", not what the
    manager will do."""

    __slots__ = ("_at", "_cost", "kind", "resident")

    def __init__(self, kind: NextUseEstimate):
        self.kind = kind
        self._cost = 0.0  # reload seconds, decayed as of request number ``_at``
        self._at = 0
        self.resident: set[str] = set()

    def cost(self, now: int) -> float:
        """Reload seconds so far, each weighing ``DECAY`` less per request since, as of
        request number ``now`` (decayed lazily: a hit changes nothing)."""
        aged: float = self._cost * DECAY ** (now - self._at)
        return aged

    def request(self, name: str, reuse: Reuse, costs: Mapping[str, Cost], room: Room) -> None:
        """Replay one request for ``name`` (its :class:`Cost` in ``costs`` when it is not
        resident here), as request number ``reuse.requests``: a hit changes nothing; a miss
        adds its reload seconds and evicts until ``room`` holds — O(resident) per eviction,
        the estimates computed once."""
        if name in self.resident:
            return
        self._cost = self.cost(reuse.requests) + costs[name].load_s
        self._at = reuse.requests
        self.resident.add(name)
        held = {d: sum(costs[n].memory.get(d, 0) for n in self.resident) for d in room.budgets}
        ghosts: list[_Ghost] | None = None  # estimates do not move within one request
        while True:
            over = [d for d, cap in room.budgets.items() if held[d] > cap]
            crowded = room.max_loaded is not None and len(self.resident) > room.max_loaded
            if not (over or crowded):
                return
            if ghosts is None:
                ghosts = [
                    _Ghost(n, costs[n].memory, reuse.last(n), costs[n].load_s, reuse.next_use(n, self.kind))
                    for n in sorted(self.resident)
                    if n != name
                ]
            pool = [g for g in ghosts if crowded or any(g.memory.get(d, 0) for d in over)]
            if not pool:
                return
            victim = first_victim(pool, over)
            ghosts.remove(victim)
            self.resident.discard(victim.name)
            for d in held:
                held[d] -= victim.memory.get(d, 0)


class Reuse:
    """Past reuse gaps per model and the expected wait until its next request.

    ``request(name)`` counts one request (the ageing clock is the number of requests);
    ``next_use(name)`` is :func:`expected_next_use` over its last ``window`` gaps, or None
    for a model never requested.  Gaps survive eviction: how a model was used is known
    before it is loaded again.

    Which estimate — ``bounded`` (capped at ``STRAY ×`` the time since: near LRU),
    ``unbounded`` (the gaps' conditional mean alone: Belady's guess on a loop) or
    ``frequency`` (the mean interval between requests, decayed, recency ignored: right
    where requests are independent draws, as under the independent reference model of
    A. V. Aho, P. J. Denning and J. D. Ullman, *Principles of optimal page replacement*,
    JACM 18(1), 1971) — is chosen by *set dueling* (M. K. Qureshi, A. Jaleel, Y. N. Patt,
    S. C. Steely and J. Emer, *Adaptive Insertion Policies for High Performance Caching*,
    ISCA 2007): LRU thrashes on a loop longer than the cache, a loop-resistant rule loses
    elsewhere, and a cache that runs them on the side and follows whichever missed less
    lately tracks the better one where one is clearly better (a loop).  Where neither is,
    it can do worse than either: on ``bench_traces.py``'s Zipf trace at seed 0, 0.99 ×
    LRU's load-seconds against 0.96 (bounded alone) and 0.97 (unbounded alone); over 18
    runs the unbounded estimate alone beat it on Zipf in 16.  The three run as
    :class:`Shadow` caches on the whole request stream, given each model's :class:`Cost`
    and the :class:`Room` (ghost caches, as the ghost lists of ARC — N. Megiddo and D. S.
    Modha, FAST 2003 — and LeCaR — G. Vietri et al., HotStorage 2018).  The bounded estimate is the default; the unbounded one is
    followed while its shadow's decayed reload seconds are below the bounded one's by more
    than ``SWITCH_LOADS`` mean loads, and the frequency one while its shadow's are below
    the one so chosen by as much: a lead of one lucky load on a trace where neither rule is
    better (runs of one model, picked at random) does not flip it.  Measured on
    ``benchmarks/bench_traces.py``, 6 seeds × 3 load-time noise modes, 18 runs a trace:
    agent loops 0.75–1.00 × LRU's load-seconds (mean 0.91; the bounded estimate alone
    0.81–1.00, mean 0.96), the periodic trace 67–70 loads but 83 in one heavy-tailed run
    (bounded alone 82–84), uniform and Zipf worst 1.000 and 1.019 (means 0.978), the
    others' worst runs within 0.1 of a percent of the bounded estimate's (``HALF_LIFE``
    50, 100, 200, 1000 and ``SWITCH_LOADS`` 0, 1, 2, 3, 4 tried for the first duel; at 2
    one run of the bursty trace was 2.4 % worse).  The frequency shadow, added later, took
    the uniform trace's mean from 0.983 to 0.978 × LRU and Zipf's from 0.985 to 0.978
    (worst 1.006 → 1.000 and 1.020 → 1.019), the others unchanged or better; alone, it
    reaches the online optimum on Zipf at seed 0 (0.93 × LRU) but costs up to 2.2 × LRU
    on the planner-between-tools trace.  A smaller margin for it (1 or 0 mean loads
    instead of 3) took Zipf's mean to 0.960 or 0.954 but the worst bursty run to 1.089 or
    1.047 and the worst tools run to 1.038 or 1.071 × LRU.  Without costs
    (``request(name)`` alone) no shadow runs and the estimate is bounded."""

    __slots__ = ("_costs", "_gaps", "_last", "_load_sum", "_shadows", "_weight", "requests", "window")

    def __init__(self, window: int = WINDOW):
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.window = window
        self.requests = 0  # requests counted so far: the ageing clock
        self._last: dict[str, int] = {}
        self._gaps: dict[str, deque[int]] = {}
        self._costs: dict[str, Cost] = {}  # each model's cost when a shadow last missed it
        self._load_sum = 0.0  # of the costs' load seconds: their mean is the duel's unit
        self._weight: dict[str, float] = {}  # decayed request count, as of its last request
        self._shadows = tuple(Shadow(kind) for kind in NEXT_USE_ESTIMATES)

    def request(
        self, name: str, cost: Cost | Callable[[], Cost] | None = None, room: Room | None = None
    ) -> None:
        """Count a request for ``name``; with its ``cost`` and the ``room``, replay it
        through every shadow cache first (they decide as the manager did: before it counts).
        ``cost`` may be a function: it is called only when a shadow misses ``name`` (a hit,
        the lease hot path, prices nothing)."""
        if cost is not None and room is not None:
            priced = False
            for shadow in self._shadows:  # a hit in every one (the lease hot path) does nothing
                if name not in shadow.resident:
                    if not priced:
                        self._price(name, cost() if callable(cost) else cost)
                        priced = True
                    shadow.request(name, self, self._costs, room)
        last = self._last.get(name)
        aged = 0.0
        if last is not None:
            gaps = self._gaps.get(name)
            if gaps is None:
                gaps = self._gaps[name] = deque(maxlen=self.window)
            gaps.append(self.requests - last)
            aged = self._weight[name] * DECAY ** (self.requests - last)
        self._last[name] = self.requests
        self._weight[name] = aged + 1.0
        self.requests += 1

    def _price(self, name: str, cost: Cost) -> None:
        old = self._costs.get(name)
        self._load_sum += cost.load_s - (old.load_s if old is not None else 0.0)
        self._costs[name] = cost

    @property
    def estimate(self) -> NextUseEstimate:
        """The next-use estimate ``next_use`` gives now (see the class docstring)."""
        if not self._costs:
            return "bounded"
        margin = SWITCH_LOADS * self._load_sum / len(self._costs)
        now = self.requests - 1  # as of the last request counted
        chosen = self._shadows[0]  # bounded: the default
        for shadow in self._shadows[1:]:  # another only where it reloaded clearly less
            if chosen.cost(now) - shadow.cost(now) > margin:
                chosen = shadow
        return chosen.kind

    def last(self, name: str) -> int:
        """The request count at ``name``'s last request (-1: never)."""
        return self._last.get(name, -1)

    def next_use(self, name: str, estimate: NextUseEstimate | None = None) -> float | None:
        """Requests until ``name``'s next request, expected — by ``estimate``, or the one
        :attr:`estimate` says: ``bounded``/``unbounded``, :func:`expected_next_use` with or
        without its cap; ``frequency``, the mean interval between its requests with each
        request weighing half as much every ``HALF_LIFE`` requests (decayed LFU, recency
        ignored: what independent draws call for; ``inf`` once its weight has decayed below
        what a float holds).  At least 0.5; None if never asked."""
        last = self._last.get(name)
        if last is None:
            return None
        kind = self.estimate if estimate is None else estimate
        if kind == "frequency":
            now: float = self._weight[name] * DECAY ** (self.requests - 1 - last)
            if now <= 0.0:  # not asked for in ~100,000 requests: the weight underflowed
                return math.inf
            total: float = (1.0 - DECAY**self.requests) / (1.0 - DECAY)  # every request's weight
            return max(total / now, 0.5)
        return expected_next_use(self._gaps.get(name, ()), self.requests - last, kind == "bounded")


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


def load_samples(name: str, measured: Mapping[str, Measured]) -> list[float]:
    """The measured loads (seconds) that estimate ``name``'s: its own last ones pooled with
    those of its *peers*; empty when ``name`` has none measured.  Their median is the
    estimate, their fastest and slowest its bounds (:func:`load_estimate`).

    A peer is a model on the same provider whose bytes are within ``SAME_SIZE`` of
    ``name``'s and whose loads do not tell it apart from ``name``'s: the medians are within
    a factor ``SAME_LOAD`` of each other, or the ranges [fastest, slowest] of the two
    models' measured loads overlap (the module docstring says why).  Two equal models
    measured 2 s and 40 s are not peers; two that measured 0.05–1.5 s each are."""
    own = measured.get(name)
    if own is None or not own.seconds:
        return []
    low, high = own.bytes * (1 - SAME_SIZE), own.bytes * (1 + SAME_SIZE)
    mid, fastest, slowest = median(own.seconds), min(own.seconds), max(own.seconds)
    pooled: list[float] = []
    for other in measured.values():
        if other.provider != own.provider or not low <= other.bytes <= high or not other.seconds:
            continue
        m = median(other.seconds)
        near = max(m, mid) <= SAME_LOAD * max(min(m, mid), 1e-9)
        overlap = min(other.seconds) <= slowest and fastest <= max(other.seconds)
        if near or overlap:
            pooled += other.seconds
    return pooled


def load_estimate(samples: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """``(median, (fastest, slowest))`` of measured loads (seconds); the bounds are None
    with fewer than two samples.  [fastest, slowest] of n samples holds the median of
    their distribution with probability 1 − 2^(1−n) whatever the distribution (94 % at
    n = 5; the order-statistic confidence interval for a median — H. A. David and H. N.
    Nagaraja, *Order Statistics*, 3rd ed., Wiley 2003, §7.1).  The core takes the median
    of the pooled loads (:func:`load_samples`) and the bounds of the model's own: how far
    its own measurements stray.  Raises ValueError on none."""
    if not samples:
        raise ValueError("no load measured")
    bounds = (min(samples), max(samples)) if len(samples) > 1 else None
    return median(samples), bounds


def expected_next_use(gaps: Iterable[int], since: int, bounded: bool = True) -> float:
    """Requests until the next request of a model last requested ``since`` requests ago,
    given its past gaps between requests: ``E[g - since | g > since]`` over the gaps (LRB's
    reuse-distance features, reduced to their conditional mean), or ``since`` itself when
    no gap was that long (it is overdue: as long again is expected — an episode that ended,
    a model no longer used); at most ``STRAY × since`` when ``bounded``, at least 0.5.

    ``since`` alone is LRU's estimate.  The cap keeps the policy near LRU where the gaps
    mislead (a model whose history mixes short gaps inside an episode with long ones between
    episodes); it still lets a model come up *sooner* than LRU thinks.  Uncapped, it is
    Belady's guess on a loop longer than the room.  Measured in
    ``benchmarks/bench_traces.py --ablation`` over 6 seeds × 3 noise modes: uncapped alone,
    the planner-between-tools trace took up to 34 % more load-seconds than LRU (capped at
    most 2.5 %), agent loops 0.73–1.00 × LRU (capped 0.81–1.00); :class:`Reuse` picks one."""
    later = [g - since for g in gaps if g > since]
    estimate = sum(later) / len(later) if later else float(since)
    return max(min(estimate, STRAY * since) if bounded else estimate, 0.5)


__all__ = [
    "DECAY",
    "EVICTIONS",
    "FOLLOWERS",
    "HALF_LIFE",
    "LOAD_SAMPLES",
    "NEXT_USE_ESTIMATES",
    "SAME_LOAD",
    "SAME_SIZE",
    "STRAY",
    "SWITCH_LOADS",
    "WINDOW",
    "Cost",
    "Eviction",
    "Measured",
    "NextUseEstimate",
    "Reuse",
    "Room",
    "Shadow",
    "Successors",
    "Victim",
    "eviction_order",
    "expected_next_use",
    "first_victim",
    "load_estimate",
    "load_samples",
    "priority",
    "significantly_cheaper",
]
