"""Issue 15, budget and accounting (failures 1-5), head-of-line blocking and starvation:
concurrent loads never overcommit a budget, and a load that can go is never held back.

Each test fails on the manager before the core rebuild for the reason the issue gives."""

from __future__ import annotations

import contextlib

import anyio
import pytest

from modelmora import ModelMoraError
from modelmora import events as ev
from modelmora.testing.faulty import FaultyProvider, gb

from .support import GB, Events, faulty_manager, hold, model, overcommits, release_all, settle

pytestmark = pytest.mark.anyio

BUDGET = {"cuda:0": 16 * GB}


# -- 1. phantom memory "used by other processes" ---------------------------------------------


async def test_01_memory_we_freed_is_not_counted_as_other_processes() -> None:
    faulty = FaultyProvider(devices={"cuda:0": gb(24)})  # a measured 24 GB card, 16 GB budget
    models = {"a": model(10), "b": model(10)}
    async with faulty_manager(faulty, models, probe=faulty.probe) as mm:
        await mm.load("a")
        await mm.status()  # reads the device: 10 GB used, all of it ours
        assert await mm.unload("a")
        await mm.load("b")  # nothing but b on the card: it fits
        assert mm.is_loaded("b")


async def test_01_unloading_an_adopted_model_frees_its_memory() -> None:
    faulty = FaultyProvider(devices={"cuda:0": gb(24)})
    faulty.add_foreign("a", {"cuda:0": gb(10)})  # found resident at start-up, adopted
    async with faulty_manager(faulty, {"b": model(10)}, probe=faulty.probe) as mm:
        assert mm.loaded() == ["faulty/a"]
        assert await mm.unload("faulty/a")
        await mm.load("b")
        assert mm.is_loaded("b")


async def test_01_memory_other_processes_take_later_is_seen() -> None:
    faulty = FaultyProvider(devices={"cuda:0": gb(24)})
    async with faulty_manager(faulty, {"b": model(10)}, probe=faulty.probe, wait_timeout=0.2) as mm:
        faulty.external["cuda:0"] = gb(10)  # another process takes 10 GB after start-up
        with contextlib.suppress(ModelMoraError):  # refused, or waiting until the timeout: both fine
            await mm.load("b")
        assert overcommits(faulty, BUDGET) == []


# -- 2. wakes reserve nothing ------------------------------------------------------------------


async def test_02_a_wake_reserves_its_memory_like_a_load() -> None:
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"p": model(10, warm_tier=True), "q": model(10)}) as mm:
        await mm.load("p")
        assert await mm.park("p")  # weights in host RAM, nothing on the GPU
        faulty.hold("wake", "p", times=1)
        async with anyio.create_task_group() as tg:
            waker = hold(tg, mm, "p")  # wakes p: 10 GB coming back to the GPU
            await faulty.wait_pending("wake", "p")
            other = hold(tg, mm, "q")  # must wait for the wake's 10 GB, not see a free GPU
            await settle()
            faulty.release("wake", "p")
            await waker.granted.wait()
            await release_all(waker)
            await other.granted.wait()
            await release_all(other)
    assert overcommits(faulty, BUDGET) == []
    assert faulty.peak["cuda:0"] <= BUDGET["cuda:0"], f"the GPU held {faulty.peak['cuda:0'] / GB:g} GB"


# -- 3. reloads reserve the estimate, not the measurement --------------------------------------


async def test_03_a_reload_reserves_what_the_model_measured_and_plan_agrees_with_admission() -> None:
    faulty = FaultyProvider()
    models = {"a": model(8), "b": model(8)}
    faulty.measure("a", {"cuda:0": gb(12)})  # the spec says 8 GB; it takes 12
    async with faulty_manager(faulty, models) as mm:
        await mm.load("a")
        await mm.unload("a")
        async with anyio.create_task_group() as tg:
            b = hold(tg, mm, "b")
            await b.granted.wait()
            verdict = mm.plan("a")  # 12 GB next to a leased 8 GB: wait
            a = hold(tg, mm, "a")
            await settle()
            admitted = [c for c in faulty.calls if c.op == "load" and c.target == "a"][1:]
            truth = faulty.describe()
            await release_all(b)
            await a.granted.wait()
            await release_all(a)
    assert type(verdict).__name__ == "Wait", verdict
    assert not admitted, (
        f"plan('a') said {verdict!r}, but use('a') was admitted against the 8 GB estimate: {truth}"
    )
    assert faulty.peak["cuda:0"] <= BUDGET["cuda:0"], f"the GPU held {faulty.peak['cuda:0'] / GB:g} GB"


# -- head-of-line blocking ---------------------------------------------------------------------


async def test_a_load_that_fits_is_not_held_behind_one_that_waits_for_memory() -> None:
    faulty = FaultyProvider()
    models = {"a": model(10), "b": model(10), "c": model(4)}
    async with faulty_manager(faulty, models) as mm:
        events = Events(mm)
        async with anyio.create_task_group() as tg:
            a = hold(tg, mm, "a")
            await a.granted.wait()
            b = hold(tg, mm, "b")  # waits: a is leased
            await settle()
            assert events.of(ev.Waiting, "b")
            c = hold(tg, mm, "c")  # 10 + 4 <= 16: fits now
            await settle()
            c_went_first = c.granted.is_set()
            await release_all(a)
            await b.granted.wait()
            await release_all(b, c)
    assert c_went_first, "c fits beside a but waits in line behind b, which waits for a's memory"


# -- starvation --------------------------------------------------------------------------------


async def test_a_load_waiting_for_a_busy_model_is_served_after_a_bounded_number_of_its_leases() -> None:
    faulty = FaultyProvider()
    models = {"a": model(10), "b": model(10)}
    async with faulty_manager(faulty, models) as mm:
        limit = int(getattr(mm.config, "lease_bypass_limit", 4))
        events = Events(mm)
        async with anyio.create_task_group() as tg:
            current = hold(tg, mm, "a")
            await current.granted.wait()
            b = hold(tg, mm, "b")  # needs a's memory; a is never idle below
            await settle()
            assert events.of(ev.Waiting, "b")
            granted_after_b = 0
            queued = None
            for _ in range(limit + 10):
                nxt = hold(tg, mm, "a")  # overlapping leases: a stays busy
                await settle()
                if not nxt.granted.is_set():
                    queued = nxt
                    break
                granted_after_b += 1
                await release_all(current)
                current = nxt
            b_was_waiting = not b.granted.is_set()
            await release_all(current)
            await b.granted.wait()
            await release_all(b)
            if queued is not None:
                await queued.granted.wait()
                await release_all(queued)
    assert granted_after_b <= limit, (
        f"a granted {granted_after_b} new leases while b waited for its memory "
        f"(lease_bypass_limit {limit}); b still waiting: {b_was_waiting}"
    )
