"""The planner checks its own plans (issue 22): ``check_plan`` applies a plan to the snapshot
and checks every device's budget, and the planner never returns a plan that fails it.

The generated tables are wider than ``tests/test_planner.py``'s: models that hold host RAM
beside VRAM, warm copies large enough to fill the RAM budget, memory other processes hold
(sometimes already past a budget), loads in flight, and candidates of unknown size."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelmora.core.planner import (
    Admit,
    Candidate,
    PlanError,
    Resident,
    Wait,
    check_plan,
    plan_admission,
    usage,
)

GB = 10**9


def test_the_check_refuses_a_park_that_overfills_host_ram() -> None:
    """The plan 906aebf's planner made for issue 22's first example: park ``s`` (8 GB of
    RAM once parked) and keep ``v`` (6 GB of RAM) on a 10 GB RAM budget."""
    residents = [
        Resident("v", {"cuda:0": 2 * GB, "cpu": 6 * GB}, last_used=1),
        Resident("s", {"cuda:0": 8 * GB}, last_used=2, sleep_memory={"cpu": 8 * GB}),
    ]
    candidate = Candidate("x", {"cuda:0": 10 * GB})
    budgets = {"cuda:0": 16 * GB, "cpu": 10 * GB}
    with pytest.raises(PlanError, match="cpu would hold 14"):
        check_plan(residents, candidate, Admit(sleep=("s",)), budgets)
    plan = plan_admission(residents, candidate, budgets)
    check_plan(residents, candidate, plan, budgets)
    assert isinstance(plan, Admit) and "v" in plan.evict, plan


def test_the_check_refuses_evicting_a_leased_model() -> None:
    residents = [Resident("a", {"cuda:0": 10 * GB}, leases=1)]
    with pytest.raises(PlanError, match="leased"):
        check_plan(residents, Candidate("b", {"cuda:0": 10 * GB}), Admit(evict=("a",)), {"cuda:0": 16 * GB})


def test_a_load_of_unknown_size_waits_for_loads_in_flight_on_its_device() -> None:
    residents = [Resident("a", {"cuda:0": 4 * GB}, settled=False, in_flight=True)]
    plan = plan_admission(residents, Candidate("u", {}, unknown=("cuda:0",)), {"cuda:0": 16 * GB})
    assert isinstance(plan, Wait) and plan.blockers == ("a",), plan
    assert "unknown" in plan.reason


def test_a_load_of_unknown_size_reserves_the_free_headroom() -> None:
    residents = [Resident("a", {"cuda:0": 4 * GB})]
    plan = plan_admission(
        residents, Candidate("u", {}, unknown=("cuda:0",)), {"cuda:0": 16 * GB}, external={"cuda:0": 2 * GB}
    )
    assert plan == Admit(reserve={"cuda:0": 10 * GB}), plan


def test_nothing_loads_beside_a_load_of_unknown_size() -> None:
    residents = [Resident("u", {}, settled=False, in_flight=True, unknown_on=("cuda:0",))]
    plan = plan_admission(residents, Candidate("b", {"cuda:0": GB}), {"cuda:0": 16 * GB})
    assert isinstance(plan, Wait) and plan.blockers == ("u",), plan
    elsewhere = plan_admission(residents, Candidate("c", {"cpu": GB}), {"cuda:0": 16 * GB, "cpu": 8 * GB})
    assert elsewhere == Admit(), elsewhere


# (settled, sleeping, in flight): ready, ready, in transition, loading, parked
states = st.sampled_from(
    [
        (True, False, False),
        (True, False, False),
        (False, False, False),
        (False, False, True),
        (True, True, False),
    ]
)


@st.composite
def tables(
    draw: st.DrawFn,
) -> tuple[list[Resident], Candidate, dict[str, int], int | None, dict[str, int]]:
    n = draw(st.integers(0, 7))
    residents = []
    for i in range(n):
        settled, sleeping, in_flight = draw(states)
        residents.append(
            Resident(
                name=f"m{i}",
                memory={"cuda:0": draw(st.integers(0, 12)) * GB, "cpu": draw(st.integers(0, 8)) * GB},
                settled=settled,
                sleeping=sleeping,
                in_flight=in_flight,
                unknown_on=("cuda:0",) if in_flight and draw(st.booleans()) else (),
                leases=draw(st.sampled_from([0, 0, 0, 1])),
                pinned=draw(st.booleans()) and draw(st.booleans()),
                group=draw(st.sampled_from([None, None, "heavy"])),
                last_used=draw(st.floats(0, 100)),
                sleep_memory=draw(
                    st.one_of(
                        st.none(),
                        st.builds(lambda c: {"cpu": c * GB}, st.integers(0, 12)),
                    )
                ),
            )
        )
    unknown = draw(st.booleans()) and draw(st.booleans())
    candidate = Candidate(
        "cand",
        {} if unknown else {"cuda:0": draw(st.integers(0, 16)) * GB, "cpu": draw(st.integers(0, 6)) * GB},
        draw(st.sampled_from([None, "heavy"])),
        unknown=("cuda:0",) if unknown else (),
    )
    budgets = {"cuda:0": draw(st.integers(1, 24)) * GB, "cpu": draw(st.integers(1, 16)) * GB}
    external = {"cuda:0": draw(st.integers(0, 6)) * GB, "cpu": draw(st.integers(0, 6)) * GB}
    max_loaded = draw(st.sampled_from([None, None, 2, 4]))
    return residents, candidate, budgets, max_loaded, external


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_the_planner_never_returns_a_plan_its_check_refuses(
    data: tuple[list[Resident], Candidate, dict[str, int], int | None, dict[str, int]],
) -> None:
    """On any table — even one others already pushed past a budget — every plan passes the
    check: no device past its budget (or worse than before, where others pushed it past),
    nothing leased, pinned or in transition evicted, the count cap kept."""
    residents, candidate, budgets, max_loaded, external = data
    plan = plan_admission(residents, candidate, budgets, max_loaded=max_loaded, external=external)
    check_plan(residents, candidate, plan, budgets, max_loaded=max_loaded, external=external)
    if isinstance(plan, Admit) and candidate.unknown:
        # it reserves what is free on its device once the plan is carried out, nothing more
        after = [r.parked() if r.name in plan.sleep else r for r in residents if r.name not in plan.evict]
        free = budgets["cuda:0"] - external["cuda:0"] - usage(after).get("cuda:0", 0)
        assert plan.reserve.get("cuda:0", 0) == max(0, free)
