"""Admission and eviction decisions, as pure functions of a table snapshot.

``plan_admission`` answers one question: can ``candidate`` become resident, and if so,
which idle models must go first?  The answer is one of

* :class:`Admit` — park these in their warm tier, evict those (possibly none), and load;
* :class:`Wait` — room can only come from models that are leased or in transition;
* :class:`Refuse` — it can never fit (bigger than the budget, or pinned models hold it).

Policy lives here: idle models in the eviction policy's order (:mod:`.policy`: cost-aware
by default, or LRU), exclusive groups (loading a ``heavy`` model
evicts the other ``heavy`` ones), one runner per runtime identity (two registry names on
one runtime model replace each other), pins (never chosen), a cap on loaded models, and
memory used by processes other than ours.  A model with a warm tier (``sleep_memory``) is parked
rather than unloaded when parking frees what is needed: it then costs host RAM instead of
VRAM and comes back far faster than a cold load.  Nothing here awaits or touches a runtime.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..spec import ModelSpec, format_size
from .policy import Eviction, eviction_order


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
    in_flight: bool = False  # loading or waking: the runtime may be allocating
    unknown_on: tuple[str, ...] = ()  # in flight with nothing telling its size: loads alone there
    load_s: float = 1.0  # seconds a load of it takes (median measured, else its spec's load_time)
    next_use: float | None = None  # requests until its next, expected (policy.Reuse); None: never asked
    load_bounds: tuple[float, float] | None = None  # its fastest, slowest measured load (s); None: < 2

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
    unknown: tuple[str, ...] = ()  # devices it loads on with nothing telling its size
    # devices it may be placed on (``device: auto``, ``devices: [...]``); empty: where its
    # memory says.  Its accelerator bytes go to one of them whole (see :func:`on_device`),
    # or for ``gpus`` > 1 in shares to that many of them (see :func:`on_devices`).
    options: tuple[str, ...] = ()
    gpus: int = 1  # devices it runs on at once (tensor parallel)


@dataclass(frozen=True, slots=True)
class Admit:
    evict: tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict)
    sleep: tuple[str, ...] = ()  # park these in their warm tier first
    reserve: Mapping[str, int] = field(default_factory=dict)  # a size-unknown load's reservation
    device: str | None = None  # the device placement chose (a candidate with options only)
    placement: str = ""  # why that device
    devices: tuple[str, ...] = ()  # every device placement chose (``device`` first)


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
    before: Mapping[str, int],
) -> tuple[dict[str, int], int]:
    """Bytes per device by which ``holding`` plus ``candidate`` exceed what is allowed, and
    by how many models the count cap is exceeded.  Allowed: the cap on every device the
    candidate needs; elsewhere the cap, or what was held ``before`` the plan when that was
    already more (a plan never pushes a device over its budget, nor makes one that others
    pushed over it worse — parks move bytes to host RAM, so every device is checked)."""
    used = usage(holding)
    memory = {}
    for d, cap in caps.items():
        need = candidate.memory.get(d, 0)
        limit = cap if need > 0 else max(cap, before.get(d, 0))
        over = used.get(d, 0) + need - limit
        if over > 0:
            memory[d] = over
    count = len(holding) + 1 - max_loaded if max_loaded is not None else 0
    return memory, max(count, 0)


def _helps(r: Resident, memory_deficit: Mapping[str, int], count_deficit: int) -> bool:
    return count_deficit > 0 or any(r.memory.get(d, 0) > 0 for d in memory_deficit)


def on_device(memory: Mapping[str, int], device: str) -> dict[str, int]:
    """``memory`` (bytes per device) placed on ``device``: every byte not on ``cpu`` moves
    there whole (a single-device model is never split; an estimate keyed ``auto`` is its
    accelerator share); host bytes stay on ``cpu``, or join them when ``device`` is ``cpu``."""
    host = memory.get("cpu", 0)
    accel = sum(n for d, n in memory.items() if d != "cpu")
    if device == "cpu":
        return {"cpu": host + accel} if host + accel else {}
    placed = {device: accel} if accel else {}
    if host:
        placed["cpu"] = host
    return placed


def on_devices(memory: Mapping[str, int], devices: Sequence[str]) -> dict[str, int]:
    """``memory`` (bytes per device) placed on several ``devices`` at once (a model that runs
    tensor parallel): when its accelerator bytes already name exactly those devices, each
    keeps its own share (an explicit split); otherwise their sum is shared equally, rounded
    up, so ``{"auto": 40 GB}`` on two devices is 20 GB on each.  Host bytes stay on ``cpu``.
    One device is :func:`on_device`."""
    if len(devices) == 1:
        return on_device(memory, devices[0])
    accel = {d: n for d, n in memory.items() if d != "cpu"}
    if set(accel) == set(devices):
        placed = dict(accel)
    else:
        total = sum(accel.values())
        share = -(-total // len(devices))
        placed = dict.fromkeys(devices, share) if total else {}
    if memory.get("cpu"):
        placed["cpu"] = memory["cpu"]
    return placed


def share_of(memory: Mapping[str, int], options: Sequence[str], gpus: int = 1) -> dict[str, int]:
    """``memory`` (an estimate or a measurement, keyed by whatever device it named) as a
    placed candidate's memory: one device's share (:func:`on_device` on the first option),
    or for several ``gpus`` the accelerator bytes under ``auto`` (shared when placed), unless
    they name ``gpus`` of the options one by one (an explicit split, kept)."""
    if gpus == 1:
        return on_device(memory, options[0])
    accel = [d for d in memory if d != "cpu"]
    if len(accel) == gpus and set(accel) <= set(options):
        return dict(memory)
    return on_device(memory, "auto")


def placement_options(spec: ModelSpec, budgets: Mapping[str, int]) -> tuple[str, ...]:
    """Devices the planner may place a model of ``spec`` on: its ``devices``, or for
    ``device: auto`` every GPU with a budget (``cuda:2`` before ``cuda:10``), or the CPU when
    no GPU has one; none for a model with a fixed device."""
    if not spec.placed:
        return ()
    if spec.devices:
        return tuple(dict.fromkeys(spec.devices))
    gpus = sorted((d for d in budgets if d.startswith("cuda:")), key=_device_order)
    return tuple(gpus) or ("cpu",)


def _device_order(device: str) -> tuple[str, int]:
    kind, _, index = device.partition(":")
    return kind, int(index) if index.isdigit() else -1


def placed(candidate: Candidate, device: str | Sequence[str]) -> Candidate:
    """``candidate`` as it would load on ``device`` (one of its options), or on a set of
    ``gpus`` of them (:func:`on_devices`)."""
    devices = (device,) if isinstance(device, str) else tuple(device)
    return replace(
        candidate,
        memory=on_devices(candidate.memory, devices),
        unknown=devices if candidate.unknown else (),
        options=(),
        gpus=1,
    )


def device_sets(options: Sequence[str], gpus: int, limit: int = 5000) -> list[tuple[str, ...]]:
    """The sets of ``gpus`` distinct devices among ``options`` (each in the options' order),
    at most ``limit`` of them (16 devices taken 8 at a time are 12 870 plans: the first
    ``limit`` are tried)."""
    options = tuple(dict.fromkeys(options))
    return list(itertools.islice(itertools.combinations(options, gpus), limit))


def plan_admission(
    residents: Iterable[Resident],
    candidate: Candidate,
    budgets: Mapping[str, int],
    *,
    max_loaded: int | None = None,
    external: Mapping[str, int] | None = None,
    external_detail: Mapping[str, str] | None = None,
    eviction: Eviction = "lru",
) -> Plan:
    """Decide how ``candidate`` gets in.  ``budgets`` are bytes per device (devices without
    a budget are not limited); ``external`` is memory held by others (other processes,
    and this process's leftovers of unloaded models); ``external_detail`` says per
    device where it is, for messages; ``eviction`` orders idle victims
    (:func:`~modelmora.core.policy.eviction_order`: ``cost`` or ``lru``).

    A candidate with ``options`` is placed (issue 23, automatic placement): each device is
    planned as if the model were fixed there, then

    1. among devices where it fits without evicting or parking anything, the best fit: the
       least bytes left free after it (large models keep room; a model of unknown size
       takes the most free instead, as it reserves all that is free);
    2. otherwise the device whose plan costs least to make room: the sum over the models it
       evicts or parks of their bytes × their load seconds (leased, pinned and busy models
       are never chosen: the single-device plan never picks them); ties by device name;
    3. otherwise a wait when any device may make room later, else a refusal naming the
       largest device and what it lacks.

    A candidate of several ``gpus`` is planned the same way over every set of that many of
    its options (its accelerator bytes shared over the set, :func:`on_devices`): best fit is
    the least bytes left over the set, the cost the set's evictions; it is never put on
    fewer devices, and one that may use fewer devices than it needs is refused at once."""
    if not candidate.options:
        return _plan_fixed(
            residents, candidate, budgets,
            max_loaded=max_loaded, external=external, external_detail=external_detail, eviction=eviction,
        )  # fmt: skip
    return _place(residents, candidate, budgets, max_loaded, external or {}, external_detail, eviction)


def _place(
    residents: Iterable[Resident],
    candidate: Candidate,
    budgets: Mapping[str, int],
    max_loaded: int | None,
    external: Mapping[str, int],
    external_detail: Mapping[str, str] | None,
    eviction: Eviction,
) -> Plan:
    snapshot = list(residents)
    caps = {d: b - external.get(d, 0) for d, b in budgets.items()}
    used = usage(r for r in snapshot if r.name != candidate.name)
    by_name = {r.name: r for r in snapshot}
    options, gpus = tuple(dict.fromkeys(candidate.options)), candidate.gpus
    if gpus > len(options):
        return Refuse(
            f"{candidate.name} needs {gpus} GPUs at once but may use only {len(options)} "
            f"({', '.join(options)})"
        )
    tried: list[tuple[tuple[str, ...], Candidate, Plan]] = []
    for devices in device_sets(options, gpus):
        here = placed(candidate, devices)
        plan = _plan_fixed(
            snapshot, here, budgets,
            max_loaded=max_loaded, external=external, external_detail=external_detail, eviction=eviction,
        )  # fmt: skip
        tried.append((devices, here, plan))
    n = len(tried)
    what = "device(s)" if gpus == 1 else f"sets of {gpus} devices"

    def left(devices: tuple[str, ...], here: Candidate) -> float:
        if any(d not in caps for d in devices):
            return float("inf")  # no budget: not limited, chosen last
        return sum(caps[d] - used.get(d, 0) - here.memory.get(d, 0) for d in devices)

    def chosen(plan: Admit, devices: tuple[str, ...], why: str) -> Admit:
        return replace(plan, device=devices[0], devices=devices, placement=why)

    free = [(d, c, p) for d, c, p in tried if isinstance(p, Admit) and not p.evict and not p.sleep]
    if free:
        if candidate.unknown:
            devices, here, plan = max(free, key=lambda t: (left(t[0], t[1]), tuple(map(_neg, t[0]))))
            why = (
                f"fits on {_names(devices)} without evicting: the most free memory of {n} {what} "
                "(its size is unknown)"
            )
        else:
            devices, here, plan = min(free, key=lambda t: (left(t[0], t[1]), t[0]))
            room = left(devices, here)
            rest = "no budget" if room == float("inf") else f"{format_size(int(room))} left there"
            why = f"fits on {_names(devices)} without evicting ({rest}; best fit of {len(free)} of {n} {what} with room)"
        assert isinstance(plan, Admit)
        return chosen(plan, devices, why)

    def cost(plan: Admit) -> float:
        victims = (by_name[x] for x in (*plan.evict, *plan.sleep) if x in by_name)
        return sum(sum(r.memory.values()) * r.load_s for r in victims)

    admits = [(d, p) for d, _, p in tried if isinstance(p, Admit)]
    if admits:
        devices, plan = min(admits, key=lambda t: (cost(t[1]), t[0]))
        going = ", ".join((*plan.evict, *plan.sleep))
        nothing = "no device has" if gpus == 1 else f"no set of {gpus} devices has"
        why = (
            f"{nothing} room without evicting; {_names(devices)} costs least to make room "
            f"(evicts {going}: {cost(plan) / 1e9:.3g} GB·s of reloading)"
        )
        return chosen(plan, devices, why)

    waits = [(d, p) for d, _, p in tried if isinstance(p, Wait)]
    if waits:
        blockers = tuple(dict.fromkeys(b for _, p in waits for b in p.blockers))
        shown = [f"{_names(d)}: {p.reason}" for d, p in waits]
        if gpus > 1 and len(shown) > 4:
            shown = [*shown[:4], f"and {len(shown) - 4} more sets"]
        return Wait(blockers=blockers, reason="; ".join(shown))

    refusals = [(d, p) for d, _, p in tried if isinstance(p, Refuse)]
    sized = [(d, p) for d, p in refusals if p.needed is not None and p.available is not None]
    if len(sized) < len(refusals) or not sized:
        return refusals[0][1]  # the same rule refuses it everywhere (a pinned runner or group)
    devices, worst = max(sized, key=lambda t: (t[1].available or 0, tuple(map(_neg, t[0]))))
    assert worst.needed is not None and worst.available is not None
    lacks = format_size(worst.needed - worst.available)
    if gpus == 1:
        reason = (
            f"{candidate.name} fits on none of {', '.join(_names(t[0]) for t in tried)}: the largest, "
            f"{devices[0]}, lacks {lacks} ({worst.reason})"
        )
    else:
        reason = (
            f"{candidate.name} needs a share on {gpus} devices at once and fits on no {gpus} devices "
            f"of {', '.join(options)}: on the closest set, {_names(devices)}, {worst.device} lacks "
            f"{lacks} ({worst.reason})"
        )
    return Refuse(
        reason,
        device=devices[0] if gpus == 1 else worst.device,
        needed=worst.needed,
        available=worst.available,
        holders=worst.holders,
    )


def _names(devices: Sequence[str]) -> str:
    return " + ".join(devices)


def _neg(device: str) -> tuple[int, ...]:
    """A key that orders device names backwards (ties in a ``max`` go to the first name)."""
    return tuple(-ord(c) for c in device)


def _plan_fixed(
    residents: Iterable[Resident],
    candidate: Candidate,
    budgets: Mapping[str, int],
    *,
    max_loaded: int | None = None,
    external: Mapping[str, int] | None = None,
    external_detail: Mapping[str, str] | None = None,
    eviction: Eviction = "lru",
) -> Plan:
    """:func:`plan_admission` for a candidate whose devices are fixed."""
    external = external or {}
    caps = {d: b - external.get(d, 0) for d, b in budgets.items()}
    others = [r for r in residents if r.name != candidate.name and r.holds_memory]
    before = usage(others)

    # 0. A load of unknown size loads alone on its devices, and nothing loads beside it.
    alone = [
        r for r in others
        if r.in_flight and any(r.memory.get(d, 0) > 0 or d in r.unknown_on for d in candidate.unknown)
    ]  # fmt: skip
    unknown_here = [
        r for r in others
        if r not in alone and any(d in r.unknown_on for d in [*candidate.memory, *candidate.unknown])
    ]  # fmt: skip
    if alone or unknown_here:
        waits_alone: list[str] = []
        if alone:
            waits_alone.append(
                f"{candidate.name}'s size is unknown: it loads alone on {', '.join(candidate.unknown)}, "
                f"after {', '.join(r.name for r in alone)}"
            )
        if unknown_here:
            waits_alone.append(
                f"{', '.join(r.name for r in unknown_here)} of unknown size "
                f"{'is' if len(unknown_here) == 1 else 'are'} loading there until measured"
            )
        return Wait(
            blockers=tuple(dict.fromkeys(r.name for r in [*alone, *unknown_here])),
            reason="; ".join(waits_alone),
        )

    if candidate.unknown:
        # nothing tells its size, but it takes more than nothing: it needs some free memory
        # on its devices (idle models make room, busy ones are waited for), then reserves
        # all that is free there
        floor = {d: max(candidate.memory.get(d, 0), 1) for d in candidate.unknown}
        candidate = replace(candidate, memory={**candidate.memory, **floor})

    # 1. Can it ever fit?
    pinned = [r for r in others if r.pinned]
    for device, need in candidate.memory.items():
        if device not in caps or need <= 0:
            continue
        cap = caps[device]
        if need > cap:
            detail = (external_detail or {}).get(
                device
            ) or f"{format_size(external.get(device, 0))} used by other processes"
            ext = f" ({detail})" if external.get(device) else ""
            return Refuse(
                f"{candidate.name} needs {_need(candidate, device, need)} but the budget is "
                f"{format_size(budgets[device])}{ext}",
                device=device, needed=need, available=cap,
            )  # fmt: skip
        held = {r.name: r.memory.get(device, 0) for r in pinned if r.memory.get(device, 0)}
        if need + sum(held.values()) > cap:
            return Refuse(
                f"{candidate.name} needs {_need(candidate, device, need)}; pinned models hold "
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

    # 3. Idle models in the policy's order until memory and the count cap are satisfied:
    #    park where a warm tier frees enough, else unload.  A second pass may unload parked
    #    models.  The order is fixed on the devices short at the start (what a victim frees
    #    there is what it is worth to this plan).
    mem_def, count_def = _deficits(remaining, candidate, caps, max_loaded, before)
    contended = tuple(mem_def)
    for second_pass in (False, True):
        pool = eviction_order((r for r in remaining if r.is_evictable()), eviction, contended)
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
            mem_def, count_def = _deficits(remaining, candidate, caps, max_loaded, before)
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

    # 4. Keep the plan minimal: give back what turned out not to be needed (the policy's
    #    choices only; exclusive-group members always go).
    member_names = {r.name for r in [*members, *runners]}
    for r in reversed(list(victims)):
        if r.name in member_names:
            continue
        trial = [*remaining, r]
        if _deficits(trial, candidate, caps, max_loaded, before) == ({}, 0):
            victims.remove(r)
            remaining = trial
    for r in reversed(list(sleepers)):
        if r.name in member_names:
            continue
        trial = [x if x.name != r.name else r for x in remaining]
        if _deficits(trial, candidate, caps, max_loaded, before) == ({}, 0):
            sleepers.remove(r)
            remaining = trial
    why = "least recently used" if eviction == "lru" else "cheapest to lose (load time × use per byte)"
    for r in [*victims, *sleepers]:
        reasons.setdefault(r.name, why)
    evict = [r.name for r in [*runners, *members] if r in victims] + [
        r.name for r in victims if r.name not in member_names
    ]
    sleep = [r.name for r in members if r in sleepers] + [
        r.name for r in sleepers if r.name not in member_names
    ]
    used = usage(remaining)
    reserve = {d: max(0, caps[d] - used.get(d, 0)) for d in candidate.unknown if d in caps}
    return Admit(
        evict=tuple(evict),
        reasons=reasons,
        sleep=tuple(sleep),
        reserve={d: n for d, n in reserve.items() if n},
    )


class PlanError(RuntimeError):
    """The planner returned a plan that breaks a budget or a rule: a bug in modelmora,
    never executed (admission logs it and refuses the load)."""


def check_plan(
    residents: Iterable[Resident],
    candidate: Candidate,
    plan: Plan,
    budgets: Mapping[str, int],
    *,
    max_loaded: int | None = None,
    external: Mapping[str, int] | None = None,
) -> None:
    """Apply ``plan`` to the snapshot and check it, independently of how it was made:
    every device's budget (host RAM that parks fill included; a device others already
    pushed over its budget may not get worse), the count cap, and that only idle,
    unpinned, settled models are evicted or parked.  Raises :class:`PlanError`."""
    if not isinstance(plan, Admit):
        return
    problems = []
    if candidate.options:
        devices = plan.devices or ((plan.device,) if plan.device is not None else ())
        if (
            len(set(devices)) != candidate.gpus
            or len(devices) != candidate.gpus
            or not set(devices) <= set(candidate.options)
            or plan.device != devices[0]
        ):
            raise PlanError(
                f"plan for {candidate.name} places it on {list(devices)}, not {candidate.gpus} "
                f"of {candidate.options}"
            )
        candidate = placed(candidate, devices)
    external = external or {}
    others = [r for r in residents if r.name != candidate.name and r.holds_memory]
    by_name = {r.name: r for r in others}
    for name in (*plan.evict, *plan.sleep):
        r = by_name.get(name)
        if r is None:
            problems.append(f"{name} is not resident")
        elif not r.is_evictable():
            problems.append(f"{name} is leased, pinned or in transition")
    for name in plan.sleep:
        r = by_name.get(name)
        if r is not None and (r.sleep_memory is None or r.sleeping):
            problems.append(f"{name} cannot be parked")
    after: list[Resident] = []
    for r in others:
        if r.name in plan.evict:
            continue
        after.append(r.parked() if r.name in plan.sleep else r)
    before = usage(others)
    used = usage(after)
    need = dict(candidate.memory)
    for d, n in plan.reserve.items():
        need[d] = max(need.get(d, 0), n)
    for d, budget in budgets.items():
        cap = budget - external.get(d, 0)
        total_after = used.get(d, 0) + need.get(d, 0)
        limit = cap if need.get(d, 0) > 0 else max(cap, before.get(d, 0))
        if total_after > limit:
            problems.append(
                f"{d} would hold {format_size(total_after)} of {format_size(cap)} "
                f"(before the plan: {format_size(before.get(d, 0))})"
            )
    if max_loaded is not None and len(after) + 1 > max_loaded:
        problems.append(f"{len(after) + 1} models loaded against a cap of {max_loaded}")
    if problems:
        raise PlanError(
            f"plan for {candidate.name} (evict {list(plan.evict)}, park {list(plan.sleep)}): "
            + "; ".join(problems)
        )


def _need(candidate: Candidate, device: str, need: int) -> str:
    if device in candidate.unknown:
        return f"free memory on {device} (its size is unknown)"
    return f"{format_size(need)} on {device}"


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
    "PlanError",
    "Refuse",
    "Resident",
    "Wait",
    "can_park_within",
    "check_plan",
    "device_sets",
    "on_device",
    "on_devices",
    "placed",
    "placement_options",
    "plan_admission",
    "share_of",
    "usage",
]
