"""The planner is pure: every policy is checked here without I/O."""

from collections.abc import Iterable, Mapping

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from modelmora.core.planner import Admit, Candidate, Refuse, Resident, Wait, plan_admission, usage

GB = 10**9
BUDGET = {"cuda:0": 16 * GB}


def within_budget(residents: Iterable[Resident], budgets: Mapping[str, int]) -> bool:
    used = usage(residents)
    return all(used.get(d, 0) <= b for d, b in budgets.items())


def r(name: str, gb: float, **kw: object) -> Resident:
    return Resident(name=name, memory={"cuda:0": int(gb * GB)}, **kw)  # type: ignore[arg-type]


def c(name: str, gb: float, group: str | None = None) -> Candidate:
    return Candidate(name, {"cuda:0": int(gb * GB)}, group)


def test_fits_without_eviction() -> None:
    assert plan_admission([r("a", 4)], c("b", 10), BUDGET) == Admit()


def test_lru_evicts_the_least_recently_used_first() -> None:
    residents = [r("old", 6, last_used=1), r("mid", 6, last_used=2), r("new", 3, last_used=3)]
    plan = plan_admission(residents, c("x", 6), BUDGET)
    assert isinstance(plan, Admit)
    assert plan.evict == ("old",)
    assert plan.reasons["old"] == "least recently used"


def test_plan_is_minimal() -> None:
    # LRU order would take "tiny" first, but it does not make enough room alone; the
    # minimal plan gives it back once "big" has been chosen.
    residents = [r("tiny", 1, last_used=1), r("big", 10, last_used=2), r("keep", 4, last_used=3)]
    plan = plan_admission(residents, c("x", 10), BUDGET)
    assert plan == Admit(evict=("big",), reasons={"big": "least recently used"})


def test_exclusive_group_evicts_other_members_even_with_room() -> None:
    residents = [r("qwen", 5, group="heavy"), r("tts", 3, group="light")]
    plan = plan_admission(residents, c("sdxl", 5, group="heavy"), BUDGET)
    assert isinstance(plan, Admit)
    assert plan.evict == ("qwen",)
    assert "exclusive group" in plan.reasons["qwen"]


def test_leased_model_is_never_chosen_so_the_candidate_waits() -> None:
    plan = plan_admission([r("a", 10, leases=1)], c("b", 10), BUDGET)
    assert isinstance(plan, Wait)
    assert plan.blockers == ("a",)


def test_leased_group_member_means_wait() -> None:
    plan = plan_admission([r("qwen", 5, group="heavy", leases=2)], c("sdxl", 5, "heavy"), BUDGET)
    assert isinstance(plan, Wait)
    assert plan.blockers == ("qwen",)
    assert "in use" in plan.reason


def test_loading_and_unloading_models_hold_memory_and_are_not_evictable() -> None:
    plan = plan_admission([r("a", 10, settled=False)], c("b", 10), BUDGET)
    assert isinstance(plan, Wait)


def test_waiting_entries_hold_no_memory() -> None:
    assert plan_admission([r("a", 10, queued=True)], c("b", 10), BUDGET) == Admit()


def test_bigger_than_budget_is_refused() -> None:
    plan = plan_admission([], c("huge", 20), BUDGET)
    assert isinstance(plan, Refuse)
    assert plan.needed == 20 * GB and plan.available == 16 * GB
    assert "budget is 16.0 GB" in plan.reason


def test_pinned_models_are_never_chosen_and_can_make_it_impossible() -> None:
    plan = plan_admission([r("pinned", 10, pinned=True), r("idle", 2)], c("x", 8), BUDGET)
    assert isinstance(plan, Refuse)
    assert plan.holders == {"pinned": 10 * GB}
    plan = plan_admission(
        [r("pinned", 6, pinned=True, last_used=0), r("idle", 6, last_used=5)], c("x", 8), BUDGET
    )
    assert plan == Admit(evict=("idle",), reasons={"idle": "least recently used"})


def test_pinned_group_member_refuses() -> None:
    plan = plan_admission([r("qwen", 5, group="heavy", pinned=True)], c("sdxl", 5, "heavy"), BUDGET)
    assert isinstance(plan, Refuse)
    assert "pinned model qwen" in plan.reason


def test_count_cap() -> None:
    residents = [r("a", 1, last_used=1), r("b", 1, last_used=2)]
    plan = plan_admission(residents, c("x", 1), BUDGET, max_loaded=2)
    assert isinstance(plan, Admit) and plan.evict == ("a",)
    plan = plan_admission([r("a", 1, leases=1), r("b", 1, leases=1)], c("x", 1), BUDGET, max_loaded=2)
    assert isinstance(plan, Wait) and "cap of 2" in plan.reason
    plan = plan_admission([r("a", 1, pinned=True)], c("x", 1), BUDGET, max_loaded=1)
    assert isinstance(plan, Refuse)


def test_external_usage_shrinks_the_budget() -> None:
    plan = plan_admission([], c("x", 10), BUDGET, external={"cuda:0": 8 * GB})
    assert isinstance(plan, Refuse) and "used by other processes" in plan.reason
    plan = plan_admission([r("a", 4)], c("x", 6), BUDGET, external={"cuda:0": 8 * GB})
    assert plan == Admit(evict=("a",), reasons={"a": "least recently used"})


def test_devices_are_independent_and_unbudgeted_devices_are_unlimited() -> None:
    residents = [Resident("gpu-model", {"cuda:0": 10 * GB}), Resident("ram-model", {"cpu": 50 * GB})]
    candidate = Candidate("x", {"cuda:0": 4 * GB, "cpu": 100 * GB})
    assert plan_admission(residents, candidate, BUDGET) == Admit()
    cand2 = Candidate("y", {"cuda:0": 8 * GB})
    plan = plan_admission(residents, cand2, BUDGET)
    assert isinstance(plan, Admit) and plan.evict == ("gpu-model",)


def test_candidate_already_in_table_is_not_counted_against_itself() -> None:
    assert plan_admission([r("x", 10, queued=True)], c("x", 10), BUDGET) == Admit()


# -- properties ------------------------------------------------------------------------

# (settled, sleeping): ready, ready, ready, in transition, parked
states = st.sampled_from([(True, False), (True, False), (True, False), (False, False), (True, True)])


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[Resident], Candidate, dict[str, int], int | None]:
    n = draw(st.integers(0, 8))
    residents = [
        Resident(
            name=f"m{i}",
            memory={"cuda:0": draw(st.integers(0, 16)) * GB, "cpu": draw(st.integers(0, 4)) * GB},
            **dict(zip(("settled", "sleeping"), draw(states), strict=True)),
            leases=draw(st.sampled_from([0, 0, 0, 1, 3])),
            pinned=draw(st.booleans()) and draw(st.booleans()),
            group=draw(st.sampled_from([None, None, "heavy", "light"])),
            last_used=draw(st.floats(0, 100)),
            sleep_memory=draw(
                st.one_of(
                    st.none(),
                    st.builds(
                        lambda g, c: {"cuda:0": g * GB // 4, "cpu": c * GB},
                        st.integers(0, 2),
                        st.integers(0, 8),
                    ),
                )
            ),
        )
        for i in range(n)
    ]
    candidate = Candidate(
        "cand",
        {"cuda:0": draw(st.integers(0, 20)) * GB, "cpu": draw(st.integers(0, 4)) * GB},
        draw(st.sampled_from([None, "heavy", "light"])),
    )
    budgets = {"cuda:0": draw(st.integers(1, 24)) * GB, "cpu": draw(st.integers(1, 12)) * GB}
    max_loaded = draw(st.sampled_from([None, 1, 2, 4]))
    return residents, candidate, budgets, max_loaded


@settings(max_examples=600, deadline=None)
@given(tables())
def test_plans_respect_budget_pins_leases_groups_and_cap(
    data: tuple[list[Resident], Candidate, dict[str, int], int | None],
) -> None:
    residents, candidate, budgets, max_loaded = data
    assume(within_budget(residents, budgets))
    assume(max_loaded is None or sum(1 for x in residents if x.holds_memory) <= max_loaded)
    plan = plan_admission(residents, candidate, budgets, max_loaded=max_loaded)
    by_name = {x.name: x for x in residents}
    if isinstance(plan, Admit):
        assert len(set(plan.evict)) == len(plan.evict)
        assert not set(plan.evict) & set(plan.sleep)
        for name in plan.evict:
            victim = by_name[name]
            assert victim.is_evictable(), f"{victim} is not evictable"
            assert not victim.pinned and victim.leases == 0
        for name in plan.sleep:
            assert by_name[name].can_park(), by_name[name]
        after = [x.parked() if x.name in plan.sleep else x for x in residents if x.name not in plan.evict] + [
            Resident(candidate.name, candidate.memory, settled=False)
        ]
        assert within_budget(after, budgets), (usage(after), budgets)
        if candidate.group is not None:
            assert not any(
                x.group == candidate.group and x.holds_memory and not x.sleeping
                for x in after[:-1]
            )
        if max_loaded is not None:
            assert sum(1 for x in after if x.holds_memory) <= max_loaded
        # minimal: no LRU victim could have been kept
        for name in plan.evict:
            if plan.reasons[name] == "least recently used" and by_name[name].sleep_memory is None:
                kept = [*after, by_name[name]]
                fits = within_budget(kept, budgets) and (
                    max_loaded is None or sum(1 for x in kept if x.holds_memory) <= max_loaded
                )
                assert not fits, f"{name} was evicted needlessly"
    elif isinstance(plan, Wait):
        assert plan.blockers
        for name in plan.blockers:
            assert not by_name[name].is_evictable() and not by_name[name].pinned
        # waiting is never hopeless: without every unpinned model, it fits
        only_pinned = [x for x in residents if x.pinned and x.holds_memory] + [
            Resident(candidate.name, candidate.memory, settled=False)
        ]
        assert within_budget(only_pinned, budgets)
    else:
        assert isinstance(plan, Refuse)
        only_pinned = [x for x in residents if x.pinned and x.holds_memory]
        grouped_pin = any(x.pinned and x.group == candidate.group and candidate.group for x in only_pinned)
        over = not within_budget([*only_pinned, Resident(candidate.name, candidate.memory)], budgets)
        capped = max_loaded is not None and len(only_pinned) + 1 > max_loaded
        assert grouped_pin or over or capped


def test_warm_tier_model_is_parked_instead_of_unloaded() -> None:
    residents = [r("qwen", 10, sleep_memory={"cuda:0": GB // 2, "cpu": 10 * GB}, last_used=1)]
    plan = plan_admission(residents, c("sdxl", 10), BUDGET)
    assert plan == Admit(evict=(), sleep=("qwen",), reasons={"qwen": "least recently used"})


def test_parking_that_overflows_ram_falls_back_to_unloading() -> None:
    budgets = {"cuda:0": 16 * GB, "cpu": 8 * GB}
    residents = [r("qwen", 10, sleep_memory={"cuda:0": 0, "cpu": 10 * GB})]
    plan = plan_admission(residents, c("sdxl", 10), budgets)
    assert plan == Admit(evict=("qwen",), reasons={"qwen": "least recently used"})


def test_exclusive_group_member_with_warm_tier_is_parked_and_sleepers_do_not_conflict() -> None:
    residents = [r("qwen", 5, group="heavy", sleep_memory={"cuda:0": 0, "cpu": 5 * GB})]
    plan = plan_admission(residents, c("sdxl", 5, "heavy"), BUDGET)
    assert plan == Admit(sleep=("qwen",), reasons={"qwen": "exclusive group 'heavy'"})
    asleep = [r("qwen", 0, group="heavy", sleeping=True)]
    assert plan_admission(asleep, c("sdxl", 5, "heavy"), BUDGET) == Admit()


def test_sleeping_models_can_be_evicted_to_free_ram() -> None:
    budgets = {"cuda:0": 16 * GB, "cpu": 8 * GB}
    residents = [Resident("parked", {"cpu": 6 * GB}, sleeping=True)]
    plan = plan_admission(residents, Candidate("embed", {"cpu": 4 * GB}), budgets)
    assert plan == Admit(evict=("parked",), reasons={"parked": "least recently used"})


def test_two_names_for_one_runner_replace_each_other() -> None:
    # Ollama holds one runner per model: a second registry name for the same target, with
    # other runner options, is a reload that replaces the first (never both counted)
    residents = [Resident("qwen-8k", {"cuda:0": 9 * GB}, key="ollama/qwen2.5:14b")]
    both = Candidate("qwen-32k", {"cuda:0": 13 * GB}, key="ollama/qwen2.5:14b")
    plan = plan_admission(residents, both, {"cuda:0": 24 * GB})
    assert plan == Admit(evict=("qwen-8k",), reasons={"qwen-8k": "same runtime model 'ollama/qwen2.5:14b'"})
    leased = [Resident("qwen-8k", {"cuda:0": 9 * GB}, leases=1, key="ollama/qwen2.5:14b")]
    assert isinstance(plan_admission(leased, both, {"cuda:0": 24 * GB}), Wait)
