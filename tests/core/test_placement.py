"""Automatic placement across GPUs (issue 23, item 3): ``device: auto`` and ``devices: [...]``.

The planner is tested on a simulated probe of 4 GPUs with different totals and memory held
by other processes: it fills without evicting while anything fits (best fit), evicts the
cheapest set (bytes × load seconds) once everything is full, and never chooses leased or
pinned models; properties: no plan is ever over any device's budget (``check_plan``), and
no plan evicts when a free placement exists."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelmora import events as ev
from modelmora.core.planner import (
    Admit,
    Candidate,
    Refuse,
    Resident,
    Wait,
    check_plan,
    on_device,
    plan_admission,
    usage,
)
from modelmora.testing.faulty import FaultyProvider

from .support import GB, Events, faulty_manager, model

# 4 GPUs: totals, and what other processes hold on each (room for models: 70, 20, 40, 14 GB)
TOTALS = {"cuda:0": 80 * GB, "cuda:1": 24 * GB, "cuda:2": 48 * GB, "cuda:3": 16 * GB}
OTHERS = {"cuda:0": 10 * GB, "cuda:1": 4 * GB, "cuda:2": 8 * GB, "cuda:3": 2 * GB}
GPUS = tuple(TOTALS)


def auto(name: str, gb: float) -> Candidate:
    return Candidate(name, {"auto": int(gb * GB)}, options=GPUS)


def plan(residents: list[Resident], candidate: Candidate) -> Any:
    p = plan_admission(residents, candidate, TOTALS, external=OTHERS)
    check_plan(residents, candidate, p, TOTALS, external=OTHERS)
    return p


# -- the pure planner -----------------------------------------------------------------------


@pytest.mark.parametrize(("gb", "device"), [(12, "cuda:3"), (18, "cuda:1"), (30, "cuda:2"), (60, "cuda:0")])
def test_best_fit_on_an_empty_machine(gb: float, device: str) -> None:
    p = plan([], auto("x", gb))
    assert isinstance(p, Admit) and p.device == device and not p.evict, p
    assert device in p.placement and "best fit" in p.placement


def test_fills_without_evicting_while_anything_fits() -> None:
    residents: list[Resident] = []
    for i, gb in enumerate([30, 12, 18, 30, 10, 20, 8]):
        p = plan(residents, auto(f"m{i}", gb))
        assert isinstance(p, Admit) and not p.evict and not p.sleep, (gb, p)
        assert p.device is not None
        residents.append(Resident(f"m{i}", {p.device: gb * GB}, last_used=i))
    # best fit: 30 → cuda:2, 12 → cuda:3, 18 → cuda:1, 30 → cuda:0, 10 → cuda:2, 20 and 8 → cuda:0
    assert usage(residents) == {"cuda:0": 58 * GB, "cuda:1": 18 * GB, "cuda:2": 40 * GB, "cuda:3": 12 * GB}
    p = plan(residents, auto("more", 13))  # 12, 2, 0, 2 GB free: nothing fits
    assert isinstance(p, Admit) and p.evict, p


def full() -> list[Resident]:
    """Every GPU full: bytes × load seconds = 700, 100, 40, 140 GB·s."""
    return [
        Resident("a", {"cuda:0": 70 * GB}, load_s=10.0, last_used=1),
        Resident("b", {"cuda:1": 20 * GB}, load_s=5.0, last_used=2),
        Resident("c", {"cuda:2": 40 * GB}, load_s=1.0, last_used=3),
        Resident("d", {"cuda:3": 14 * GB}, load_s=10.0, last_used=4),
    ]


def test_with_everything_full_evicts_the_cheapest_set() -> None:
    p = plan(full(), auto("x", 12))
    assert isinstance(p, Admit) and p.device == "cuda:2" and p.evict == ("c",), p
    assert "costs least" in p.placement


def test_leased_and_pinned_models_are_never_chosen() -> None:
    residents = full()
    residents[2] = Resident("c", {"cuda:2": 40 * GB}, load_s=1.0, leases=1)
    residents[3] = Resident("d", {"cuda:3": 14 * GB}, load_s=10.0, pinned=True)
    p = plan(residents, auto("x", 12))
    assert isinstance(p, Admit) and p.device == "cuda:1" and p.evict == ("b",), p


def test_waits_when_only_busy_models_could_make_room() -> None:
    residents = [Resident(r.name, r.memory, leases=1) for r in full()]
    p = plan(residents, auto("x", 12))
    assert isinstance(p, Wait) and set(p.blockers) == {"a", "b", "c", "d"}, p


def test_a_model_no_device_can_hold_is_refused_naming_the_largest() -> None:
    p = plan([], auto("huge", 75))
    assert isinstance(p, Refuse) and p.device == "cuda:0", p
    assert "largest, cuda:0" in p.reason and "lacks 5.0 GB" in p.reason, p.reason


def test_a_devices_list_limits_the_choice() -> None:
    c = Candidate("x", {"cuda:0": 12 * GB, "cpu": 1 * GB}, options=("cuda:0", "cuda:2"))
    p = plan([], c)
    assert isinstance(p, Admit) and p.device == "cuda:2", p
    assert on_device(c.memory, "cuda:2") == {"cuda:2": 12 * GB, "cpu": 1 * GB}


def test_a_fixed_model_plans_as_before() -> None:
    p = plan([], Candidate("x", {"cuda:1": 12 * GB}))
    assert isinstance(p, Admit) and p.device is None and not p.placement


# -- properties -----------------------------------------------------------------------------


@st.composite
def machines(draw: st.DrawFn) -> tuple[list[Resident], Candidate, dict[str, int], dict[str, int]]:
    budgets = {d: draw(st.integers(8, 80)) * GB for d in GPUS}
    external = {d: draw(st.integers(0, 8)) * GB for d in GPUS}
    residents = []
    for i in range(draw(st.integers(0, 8))):
        device = draw(st.sampled_from(GPUS))
        residents.append(
            Resident(
                f"r{i}",
                {device: draw(st.integers(1, 40)) * GB},
                leases=draw(st.sampled_from([0, 0, 1])),
                pinned=draw(st.booleans()) and draw(st.booleans()),
                last_used=draw(st.floats(0, 100)),
                load_s=draw(st.floats(0.001, 60)),
            )
        )
    options = tuple(draw(st.lists(st.sampled_from(GPUS), min_size=1, max_size=4, unique=True)))
    candidate = Candidate("x", {"auto": draw(st.integers(1, 60)) * GB}, options=options)
    return residents, candidate, budgets, external


def free_fits(
    residents: list[Resident], candidate: Candidate, budgets: dict[str, int], external: dict[str, int]
) -> list[str]:
    """Devices where the candidate fits as things are (an oracle independent of the planner)."""
    used = usage(residents)
    need = sum(candidate.memory.values())
    return [d for d in candidate.options if used.get(d, 0) + need <= budgets[d] - external[d]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines())
def test_never_over_any_budget_and_never_evicts_when_a_free_placement_exists(
    machine: tuple[list[Resident], Candidate, dict[str, int], dict[str, int]],
) -> None:
    residents, candidate, budgets, external = machine
    p = plan_admission(residents, candidate, budgets, external=external)
    check_plan(residents, candidate, p, budgets, external=external)  # every budget; leased/pinned kept
    fits = free_fits(residents, candidate, budgets, external)
    if fits:
        assert isinstance(p, Admit) and not p.evict and not p.sleep and p.device in fits, (fits, p)
    if isinstance(p, Admit):
        assert p.device in candidate.options
        busy = {r.name for r in residents if r.leases or r.pinned}
        assert not busy & set(p.evict)


# -- through the manager ----------------------------------------------------------------------


def gpus(**config: Any) -> tuple[FaultyProvider, dict[str, Any]]:
    faulty = FaultyProvider(devices=TOTALS)
    faulty.external.update(OTHERS)
    budgets = {d: f"{n // GB}GB" for d, n in TOTALS.items()}
    return faulty, {"budgets": budgets, "probe": faulty.probe, **config}


def where(faulty: FaultyProvider, target: str) -> dict[str, int]:
    return faulty.instances[target].memory


@pytest.mark.anyio
async def test_auto_models_land_where_the_planner_says() -> None:
    faulty, cfg = gpus()
    models = {
        "small": model(12, device="auto"),
        "mid": model(18, device="auto"),
        "big": model(30, devices=["cuda:0", "cuda:2"]),
        "late": model(10, device="auto"),
    }
    async with faulty_manager(faulty, models, **cfg) as mm:
        events = Events(mm)
        for name in models:
            await mm.load(name)
        assert where(faulty, "small") == {"cuda:3": 12 * GB}
        assert where(faulty, "mid") == {"cuda:1": 18 * GB}
        assert where(faulty, "big") == {"cuda:2": 30 * GB}
        assert where(faulty, "late") == {"cuda:2": 10 * GB}  # best fit: 10 GB left there, 70 on cuda:0
        loading = {e.model: e.note for e in events.of(ev.Loading)}
        assert "cuda:3" in loading["small"] and "best fit" in loading["small"]
        assert sorted(faulty.instances) == sorted(models)  # nothing evicted


@pytest.mark.anyio
async def test_auto_evicts_the_cheapest_when_everything_is_full() -> None:
    faulty, cfg = gpus()
    models = {
        "a": model(70, device="cuda:0"),
        "b": model(20, device="cuda:1"),
        "c": model(40, device="cuda:2"),
        "d": model(14, device="cuda:3"),
        "x": model(12, device="auto"),
    }
    async with faulty_manager(faulty, models, **cfg) as mm:
        events = Events(mm)
        for name in "abcd":
            await mm.load(name)
        async with mm.use("b"):  # leased: never chosen
            await mm.load("x")
        assert where(faulty, "x") == {"cuda:3": 12 * GB}  # d: the fewest bytes to reload
        assert sorted(faulty.instances) == ["a", "b", "c", "x"]
        note = next(e.note for e in events.of(ev.Loading, "x"))
        assert "cuda:3" in note and "costs least" in note


@pytest.mark.anyio
async def test_auto_without_a_gpu_budget_places_on_the_cpu() -> None:
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"m": model(4, device="auto")}, budgets={"cpu": "16GB"}) as mm:
        await mm.load("m")
        assert where(faulty, "m") == {"cpu": 4 * GB}
        assert mm.spec("m").device == "auto"  # the registry keeps saying auto


@pytest.mark.anyio
async def test_plan_previews_the_placement() -> None:
    faulty, cfg = gpus()
    async with faulty_manager(faulty, {"m": model(12, device="auto")}, **cfg) as mm:
        p = mm.plan("m")
        assert isinstance(p, Admit) and p.device == "cuda:3" and "best fit" in p.placement


def test_modelmora_plan_previews_where_each_model_goes(tmp_path: Any) -> None:
    import json

    from typer.testing import CliRunner

    from modelmora.cli import app

    config = tmp_path / "modelmora.yaml"
    config.write_text(
        "budgets: {cuda:0: 24GB, cuda:1: 16GB}\n"
        "models:\n"
        "  a: {memory: 12GB, device: auto}\n"
        "  b: {memory: 14GB, device: auto}\n"
        "  c: {memory: 10GB, devices: [cuda:0, cuda:1]}\n"
    )
    result = CliRunner().invoke(app, ["plan", "a", "b", "c", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    steps = json.loads(result.stdout)["steps"]
    assert [s["placed"].split(":", 2)[:2] for s in steps] == [["cuda", "1"], ["cuda", "0"], ["cuda", "0"]]
    assert all("without evicting" in s["placed"] for s in steps)


# -- multi-GPU shares -----------------------------------------------------------------------


def shared(name: str, gb: float, gpus: int, options: tuple[str, ...] = GPUS) -> Candidate:
    """A model of ``gb`` GB that runs on ``gpus`` devices: ``gb / gpus`` on each."""
    return Candidate(name, {"auto": int(gb * GB)}, options=options, gpus=gpus)


def test_a_two_gpu_model_gets_two_devices_best_fit_first() -> None:
    # 20 GB on each of two: room 70, 20, 40, 14 → cuda:1 (0 left) and cuda:2 (20 left)
    p = plan([], shared("tp", 40, 2))
    assert isinstance(p, Admit) and p.devices == ("cuda:1", "cuda:2") and not p.evict, p
    assert p.device == "cuda:1"
    assert "cuda:1" in p.placement and "cuda:2" in p.placement and "best fit" in p.placement


def test_a_two_gpu_model_evicts_the_cheapest_pair_when_everything_is_full() -> None:
    # 12 GB on each: costs a 700, b 100, c 40, d 140 GB·s → cuda:2 (c) and cuda:1 (b)
    p = plan(full(), shared("tp", 24, 2))
    assert isinstance(p, Admit) and p.devices == ("cuda:1", "cuda:2"), p
    assert set(p.evict) == {"b", "c"}, p
    assert "costs least" in p.placement


def test_a_two_gpu_model_waits_when_only_one_device_can_make_room() -> None:
    residents = full()
    for i in range(3):  # a, b, c leased: only d's cuda:3 could be freed
        residents[i] = replace(residents[i], leases=1)
    p = plan(residents, shared("tp", 24, 2))
    assert isinstance(p, Wait), p


def test_a_two_gpu_model_never_goes_on_one_device() -> None:
    # 50 GB would fit whole on cuda:0, but as two shares of 25 only cuda:0 and cuda:2 hold one
    p = plan([], shared("tp", 50, 2))
    assert isinstance(p, Admit) and p.devices == ("cuda:0", "cuda:2"), p
    # a share no second device can hold: refused, naming what the second-largest lacks
    p = plan([], shared("tp", 100, 2))
    assert isinstance(p, Refuse), p
    assert "2 devices" in p.reason, p.reason


def test_a_model_needing_more_gpus_than_it_may_use_is_refused_at_once() -> None:
    p = plan([], shared("tp", 20, 2, options=("cuda:0",)))
    assert isinstance(p, Refuse) and "needs 2 GPUs" in p.reason, p.reason


def test_explicit_per_device_shares_are_kept_on_their_devices() -> None:
    from modelmora.core.planner import on_devices

    c = Candidate("tp", {"cuda:0": 30 * GB, "cuda:2": 10 * GB}, options=("cuda:0", "cuda:2"), gpus=2)
    p = plan([], c)
    assert isinstance(p, Admit) and p.devices == ("cuda:0", "cuda:2"), p
    assert on_devices(c.memory, ("cuda:0", "cuda:2")) == {"cuda:0": 30 * GB, "cuda:2": 10 * GB}
    assert on_devices({"auto": 40 * GB, "cpu": GB}, ("cuda:1", "cuda:3")) == {
        "cuda:1": 20 * GB,
        "cuda:3": 20 * GB,
        "cpu": GB,
    }


@st.composite
def shared_machines(draw: st.DrawFn) -> tuple[list[Resident], Candidate, dict[str, int], dict[str, int]]:
    residents, _single, budgets, external = draw(machines())
    # some residents hold shares on several devices too
    for i in range(draw(st.integers(0, 3))):
        devices = draw(st.lists(st.sampled_from(GPUS), min_size=2, max_size=4, unique=True))
        share = draw(st.integers(1, 20)) * GB
        residents.append(
            Resident(
                f"s{i}", dict.fromkeys(devices, share), leases=draw(st.sampled_from([0, 0, 1])), load_s=2.0
            )
        )
    gpus = draw(st.integers(1, 4))
    options = tuple(draw(st.lists(st.sampled_from(GPUS), min_size=1, max_size=4, unique=True)))
    memory = {"auto": draw(st.integers(1, 80)) * GB}
    if draw(st.booleans()):
        memory["cpu"] = draw(st.integers(0, 4)) * GB
    return residents, Candidate("x", memory, options=options, gpus=gpus), budgets | {"cpu": 64 * GB}, external


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shared_machines())
def test_multi_device_placements_never_exceed_any_devices_budget(
    machine: tuple[list[Resident], Candidate, dict[str, int], dict[str, int]],
) -> None:
    residents, candidate, budgets, external = machine
    p = plan_admission(residents, candidate, budgets, external=external)
    check_plan(residents, candidate, p, budgets, external=external)
    if not isinstance(p, Admit):
        return
    # an oracle independent of check_plan: the plan applied, device by device
    assert len(p.devices) == candidate.gpus == len(set(p.devices)) and set(p.devices) <= set(
        candidate.options
    )
    after = [r for r in residents if r.name not in p.evict]
    share = -(-candidate.memory["auto"] // candidate.gpus)
    used = usage(after)
    before = usage(residents)
    for d in GPUS:
        mine = share if d in p.devices else 0
        limit = budgets[d] - external[d]
        assert used.get(d, 0) + mine <= max(limit, before.get(d, 0) if not mine else limit), (d, p)
    busy = {r.name for r in residents if r.leases or r.pinned}
    assert not busy & set(p.evict)


@pytest.mark.anyio
async def test_a_two_gpu_model_loads_its_shares_on_the_chosen_devices() -> None:
    faulty, cfg = gpus()
    models = {"tp": model(40, device="auto", gpus=2), "one": model(12, device="auto")}
    async with faulty_manager(faulty, models, **cfg) as mm:
        events = Events(mm)
        await mm.load("tp")
        await mm.load("one")
        assert where(faulty, "tp") == {"cuda:1": 20 * GB, "cuda:2": 20 * GB}
        assert mm.spec("tp").gpus == 2 and mm.spec("tp").device == "auto"
        assert where(faulty, "one") == {"cuda:3": 12 * GB}
        note = next(e.note for e in events.of(ev.Loading, "tp"))
        assert "cuda:1" in note and "cuda:2" in note


def test_modelmora_plan_previews_a_two_gpu_model_on_two_devices(tmp_path: Any) -> None:
    import json

    from typer.testing import CliRunner

    from modelmora.cli import app

    config = tmp_path / "modelmora.yaml"
    config.write_text(
        "budgets: {cuda:0: 24GB, cuda:1: 16GB, cuda:2: 24GB}\nmodels:\n  tp: {memory: 30GB, gpus: 2}\n"
    )
    result = CliRunner().invoke(app, ["plan", "tp", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    step = json.loads(result.stdout)["steps"][0]
    assert step["placed"].startswith("cuda:0 + cuda:1: "), step
    assert step["memory"] == {"cuda:0": 15 * GB, "cuda:1": 15 * GB}
