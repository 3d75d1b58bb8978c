"""Admission and eviction decisions, as pure functions of a table snapshot.

``plan_admission`` answers one question: can ``candidate`` become resident, and if so,
which idle models must go first?  The answer is one of

* :class:`Admit` — park these in their warm tier, evict those (possibly none), and load;
* :class:`Wait` — room can only come from models that are leased or in transition;
* :class:`Refuse` — it can never fit (bigger than the budget, or pinned models hold it).

Policy lives here: LRU among idle models, exclusive groups (loading a ``heavy`` model
evicts the other ``heavy`` ones), one runner per runtime identity (two registry names on
one runtime model replace each other), pins (never chosen), a cap on loaded models, and
memory used by processes other than ours.  A model with a warm tier (``sleep_memory``) is parked
rather than unloaded when parking frees what is needed: it then costs host RAM instead of
VRAM and comes back far faster than a cold load.  Nothing here awaits or touches a runtime.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..spec import format_size


@dataclass(frozen=True, slots=True)
class Resident:
    """A planner's view of one table entry: bytes per device it is counted for, and what
    policy needs to know about it."""

    name: str
    memory: Mapping[str, int] = field(default_factory=dict)
    leases: int = 0  # holders and waiters
    pinned: bool = False
    group: str | None = None
    last_used: float = 0.0
    sleep_memory: Mapping[str, int] | None = None  # held in the warm tier; None: no warm tier
    sleeping: bool = False  # in its warm tier now
    settled: bool = True  # False while loading, parking, waking or unloading
    key: str | None = None  # the runtime's identity of its target (one runner per key)
    queued: bool = False  # waiting for admission: holds nothing yet

    def is_evictable(self) -> bool:
        return self.settled and self.leases == 0 and not self.pinned

    def can_park(self) -> bool:
        return not self.sleeping and self.sleep_memory is not None and self.is_evictable()

    def parked(self) -> Resident:
        return replace(self, memory=dict(self.sleep_memory or {}), sleeping=True)

    @property
    def holds_memory(self) -> bool:
        return not self.queued


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    memory: Mapping[str, int] = field(default_factory=dict)
    group: str | None = None
    key: str | None = None  # models with the same key are one runner: they replace each other


@dataclass(frozen=True, slots=True)
class Admit:
    evict: tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict)
    sleep: tuple[str, ...] = ()  # park these in their warm tier first


@dataclass(frozen=True, slots=True)
class Wait:
    blockers: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str
    device: str | None = None
    needed: int | None = None
    available: int | None = None
    holders: Mapping[str, int] = field(default_factory=dict)


Plan = Admit | Wait | Refuse


def usage(residents: Iterable[Resident]) -> dict[str, int]:
    """Bytes per device held by entries that hold memory."""
    used: dict[str, int] = {}
    for r in residents:
        if r.holds_memory:
            for device, n in r.memory.items():
                used[device] = used.get(device, 0) + n
    return used


def _deficits(
    holding: Sequence[Resident],
    candidate: Candidate,
    caps: Mapping[str, int],
    max_loaded: int | None,
) -> tuple[dict[str, int], int]:
    used = usage(holding)
    memory = {
        d: used.get(d, 0) + candidate.memory.get(d, 0) - cap
        for d, cap in caps.items()
        if candidate.memory.get(d, 0) > 0
    }
    count = len(holding) + 1 - max_loaded if max_loaded is not None else 0
    return {d: n for d, n in memory.items() if n > 0}, max(count, 0)


def _helps(r: Resident, memory_deficit: Mapping[str, int], count_deficit: int) -> bool:
    return count_deficit > 0 or any(r.memory.get(d, 0) > 0 for d in memory_deficit)


def plan_admission(
    residents: Iterable[Resident],
    candidate: Candidate,
    budgets: Mapping[str, int],
    *,
    max_loaded: int | None = None,
    external: Mapping[str, int] | None = None,
) -> Plan:
    """Decide how ``candidate`` gets in.  ``budgets`` are bytes per device (devices without
    a budget are not limited); ``external`` is memory held by other processes."""
    external = external or {}
    caps = {d: b - external.get(d, 0) for d, b in budgets.items()}
    others = [r for r in residents if r.name != candidate.name and r.holds_memory]

    # 1. Can it ever fit?
    pinned = [r for r in others if r.pinned]
    for device, need in candidate.memory.items():
        if device not in caps or need <= 0:
            continue
        cap = caps[device]
        if need > cap:
            ext = (
                f" ({format_size(external[device])} used by other processes)" if external.get(device) else ""
            )
            return Refuse(
                f"{candidate.name} needs {format_size(need)} on {device} but the budget is "
                f"{format_size(budgets[device])}{ext}",
                device=device, needed=need, available=cap,
            )  # fmt: skip
        held = {r.name: r.memory.get(device, 0) for r in pinned if r.memory.get(device, 0)}
        if need + sum(held.values()) > cap:
            return Refuse(
                f"{candidate.name} needs {format_size(need)} on {device}; pinned models hold "
                f"{format_size(sum(held.values()))} of the {format_size(cap)} budget "
                f"({', '.join(held)}); unpin one or unload it with force",
                device=device, needed=need, available=cap - sum(held.values()), holders=held,
            )  # fmt: skip
    if max_loaded is not None and len(pinned) + 1 > max_loaded:
        return Refuse(
            f"{candidate.name} cannot load: {len(pinned)} pinned models already fill the cap of "
            f"{max_loaded} loaded models ({', '.join(r.name for r in pinned)})"
        )

    # 2. Exclusive group: every other active member must go (parked, or unloaded); another
    #    name for the same runner must go entirely (the runtime holds one of them at a time).
    reasons: dict[str, str] = {}
    runners = [r for r in others if candidate.key is not None and r.key == candidate.key]
    members = [
        r for r in others
        if candidate.group is not None and r.group == candidate.group and not r.sleeping and r not in runners
    ]  # fmt: skip
    for r in [*runners, *members]:
        if r.pinned:
            why = (
                "runs the same runtime model as"
                if r in runners
                else f"is in exclusive group {candidate.group!r} with"
            )
            return Refuse(f"{candidate.name} {why} pinned model {r.name}; unpin it or unload it with force")
        reasons[r.name] = (
            f"same runtime model {candidate.key!r}"
            if r in runners
            else f"exclusive group {candidate.group!r}"
        )
    blocked = [r for r in [*runners, *members] if not r.is_evictable()]
    remaining = [r for r in others if r not in members and r not in runners]
    sleepers: list[Resident] = []  # originals of the models parked by this plan
    victims: list[Resident] = [r for r in runners if r.is_evictable()]
    for r in members:
        if r.can_park() and _park_fits(r, remaining, caps, candidate):
            sleepers.append(r)
            remaining.append(r.parked())
        elif r.is_evictable():
            victims.append(r)

    # 3. LRU among idle models until memory and the count cap are satisfied: park where a
    #    warm tier frees enough, else unload.  A second pass may unload parked models.
    mem_def, count_def = _deficits(remaining, candidate, caps, max_loaded)
    for second_pass in (False, True):
        pool = sorted((r for r in remaining if r.is_evictable()), key=lambda r: r.last_used)
        for r in pool:
            if not mem_def and not count_def:
                break
            if (
                not second_pass
                and r.can_park()
                and not count_def
                and _park_helps(r, mem_def, remaining, caps, candidate)
            ):
                remaining[remaining.index(r)] = r.parked()
                sleepers.append(r)
            elif _helps(r, mem_def, count_def) and (second_pass or not r.can_park() or count_def):
                remaining.remove(r)
                parked_here = next((x for x in sleepers if x.name == r.name), None)
                if parked_here is not None:
                    sleepers.remove(parked_here)
                    r = parked_here
                victims.append(r)
            else:
                continue
            mem_def, count_def = _deficits(remaining, candidate, caps, max_loaded)
        if not mem_def and not count_def:
            break

    if blocked or mem_def or count_def:
        holders = [
            r for r in remaining
            if not r.pinned and not r.is_evictable() and _helps(r, mem_def, count_def)
        ]  # fmt: skip
        names = tuple(r.name for r in [*blocked, *holders])
        waits: list[str] = []
        if blocked:
            waits.append(
                f"{', '.join(r.name for r in blocked)} must go first "
                f"({'; '.join(reasons[r.name] for r in blocked)}) but "
                f"{'is' if len(blocked) == 1 else 'are'} in use"
            )
        if mem_def:
            waits.append("short of " + ", ".join(f"{format_size(n)} on {d}" for d, n in mem_def.items()))
        if count_def:
            waits.append(f"the cap of {max_loaded} loaded models is reached")
        return Wait(blockers=names, reason="; ".join(waits))

    # 4. Keep the plan minimal: give back what turned out not to be needed (LRU choices
    #    only; exclusive-group members always go).
    member_names = {r.name for r in [*members, *runners]}
    for r in reversed(list(victims)):
        if r.name in member_names:
            continue
        trial = [*remaining, r]
        if _deficits(trial, candidate, caps, max_loaded) == ({}, 0):
            victims.remove(r)
            remaining = trial
    for r in reversed(list(sleepers)):
        if r.name in member_names:
            continue
        trial = [x if x.name != r.name else r for x in remaining]
        if _deficits(trial, candidate, caps, max_loaded) == ({}, 0):
            sleepers.remove(r)
            remaining = trial
    for r in [*victims, *sleepers]:
        reasons.setdefault(r.name, "least recently used")
    evict = [r.name for r in [*runners, *members] if r in victims] + [
        r.name for r in victims if r.name not in member_names
    ]
    sleep = [r.name for r in members if r in sleepers] + [
        r.name for r in sleepers if r.name not in member_names
    ]
    return Admit(evict=tuple(evict), reasons=reasons, sleep=tuple(sleep))


def can_park_within(
    r: Resident,
    others: Iterable[Resident],
    budgets: Mapping[str, int],
    external: Mapping[str, int] | None = None,
) -> bool:
    """Whether parking ``r`` (e.g. when idle) keeps every budget: its RAM must fit."""
    external = external or {}
    caps = {d: b - external.get(d, 0) for d, b in budgets.items()}
    return r.sleep_memory is not None and _park_fits(r, [o for o in others if o.name != r.name], caps)


def _park_fits(
    r: Resident, others: Sequence[Resident], caps: Mapping[str, int], candidate: Candidate | None = None
) -> bool:
    """Parking ``r`` must not push a device it moves memory to over its budget, counting
    what the candidate will hold there."""
    used = usage(others)
    need = candidate.memory if candidate is not None else {}
    parked = r.sleep_memory or {}
    return all(
        used.get(d, 0) + need.get(d, 0) + n <= caps[d]
        for d, n in parked.items()
        if d in caps and n > r.memory.get(d, 0)
    )


def _park_helps(
    r: Resident,
    mem_def: Mapping[str, int],
    remaining: Sequence[Resident],
    caps: Mapping[str, int],
    candidate: Candidate,
) -> bool:
    parked = r.sleep_memory or {}
    frees = any(r.memory.get(d, 0) > parked.get(d, 0) for d in mem_def)
    return frees and _park_fits(r, [x for x in remaining if x is not r], caps, candidate)


__all__ = [
    "Admit",
    "Candidate",
    "Plan",
    "Refuse",
    "Resident",
    "Wait",
    "can_park_within",
    "plan_admission",
    "usage",
]
