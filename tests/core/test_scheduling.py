"""Issue 25, items 1 to 3: swap-aware admission of requests, priorities with ageing and
weighted fair shares, back-pressure.

Time is a fake clock the test moves (the manager's ``clock``): every bound is checked by
counting and ordering grants, never by measuring how long something took."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from modelmora import ModelManager
from modelmora.memory import StaticProbe
from modelmora.testing.faulty import FaultyProvider

from .support import model, release_all, settle

pytestmark = pytest.mark.anyio


class Clock:
    """A clock the test moves: seconds since the test began."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Caller:
    """A lease in a background task, with how it asks (priority, key, weight); ``order``
    collects the callers in the order their leases were granted."""

    def __init__(self, mm: ModelManager, name: str, order: list[Caller], **how: Any):
        self.mm, self.name, self.how, self.order = mm, name, how, order
        self.granted = anyio.Event()
        self.release = anyio.Event()
        self.done = anyio.Event()
        self.error: BaseException | None = None

    async def run(self) -> None:
        try:
            async with self.mm.use(self.name, **self.how):
                self.order.append(self)
                self.granted.set()
                await self.release.wait()
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()

    def __repr__(self) -> str:
        return f"<{self.name} {self.how}>"


def call(tg: anyio.abc.TaskGroup, mm: ModelManager, name: str, order: list[Caller], **how: Any) -> Caller:
    caller = Caller(mm, name, order, **how)
    tg.start_soon(caller.run)
    return caller


def faulty_manager(
    faulty: FaultyProvider, models: dict[str, Any], *, clock: Clock | None = None, **config: Any
) -> ModelManager:
    """A manager on ``faulty`` with a 16 GB cuda:0 budget, the test's clock and no background
    work but what the test asks for."""
    cfg = {
        "budgets": {"cuda:0": "16GB"},
        "reaper_interval": 3600,
        "reconcile_interval": 3600,
        "watchdog": {"enabled": False},
        **config,
        "models": models,
    }
    return ModelManager(cfg, providers={"faulty": faulty}, probe=StaticProbe({}), clock=clock or Clock())


GROUP = {"a": model(10, group="heavy"), "b": model(10, group="heavy")}


# -- 1. swap-aware admission: batching, starvation and thrash bounds ------------------------------


async def test_a_model_queued_behind_steady_traffic_is_served_within_max_wait() -> None:
    """``b`` needs the memory of ``a``, which steady overlapping traffic keeps busy (each new
    lease on ``a`` arrives before the last one ends).  The count bound is out of reach
    (``max_batch_before_swap: 1000``); the clock moves 1 s per request, so with ``max_wait:
    10`` at most 10 leases on ``a`` may be granted ahead of ``b``, and the first one refused
    is served after ``b``.  Red before issue 25: no bound in seconds exists
    (``lease_bypass_limit`` counts leases only)."""
    clock, order = Clock(), []
    faulty = FaultyProvider()
    cfg = {"scheduling": {"max_batch_before_swap": 1000, "max_wait": 10}}
    async with faulty_manager(faulty, GROUP, clock=clock, **cfg) as mm, anyio.create_task_group() as tg:
        current = call(tg, mm, "a", order)
        await current.granted.wait()
        b = call(tg, mm, "b", order)
        await settle()
        ahead = 0
        for _ in range(50):
            clock.now += 1.0
            new = call(tg, mm, "a", order)
            await settle()
            if not new.granted.is_set():
                break  # queued behind b
            ahead += 1
            await release_all(current)
            current = new
        assert 1 <= ahead <= 10, f"{ahead} leases on a were granted while b waited (max_wait: 10 steps)"
        assert not b.granted.is_set()
        await release_all(current)
        with anyio.fail_after(10):
            await b.granted.wait()
        assert order[-1] is b and not new.granted.is_set(), order
        await release_all(b)
        with anyio.fail_after(10):
            await new.granted.wait()
        await release_all(new)


async def test_leases_ahead_of_a_swap_stop_at_max_batch_before_swap() -> None:
    """The count bound: with ``max_batch_before_swap: 3`` exactly three more leases on the
    busy ``a`` are granted while ``b`` waits for its memory, and the clock never moves."""
    clock, order = Clock(), []
    faulty = FaultyProvider()
    cfg = {"scheduling": {"max_batch_before_swap": 3, "max_wait": 1000}}
    async with faulty_manager(faulty, GROUP, clock=clock, **cfg) as mm, anyio.create_task_group() as tg:
        first = call(tg, mm, "a", order)
        await first.granted.wait()
        b = call(tg, mm, "b", order)
        await settle()
        more = [call(tg, mm, "a", order) for _ in range(5)]
        await settle()
        assert [c.granted.is_set() for c in more] == [True, True, True, False, False]
        await release_all(first, *more[:3])
        with anyio.fail_after(10):
            await b.granted.wait()
        assert not more[3].granted.is_set()
        await release_all(b)
        with anyio.fail_after(10):
            await more[3].granted.wait()
            await more[4].granted.wait()
        await release_all(*more[3:])


async def test_a_model_just_loaded_stays_min_residency_before_a_swap_evicts_it() -> None:
    """The thrash bound: ``a`` was loaded at t=0 and is idle; ``b`` (same priority) must wait
    until ``min_residency`` (30 s) has passed before ``a`` is evicted for it; at t=29 it
    still waits, at t=30 it loads.  A request of higher priority is urgent: it evicts at
    once."""
    clock, order = Clock(), []
    faulty = FaultyProvider()
    cfg = {"scheduling": {"min_residency": 30}, "reaper_interval": 0.01}
    models = {**GROUP, "c": model(10, group="heavy")}
    async with faulty_manager(faulty, models, clock=clock, **cfg) as mm, anyio.create_task_group() as tg:
        await mm.load("a")
        b = call(tg, mm, "b", order)
        clock.now = 29.0
        await anyio.sleep(0.1)  # the admission looks again every reaper_interval
        await settle()
        assert not b.granted.is_set() and mm.is_loaded("a"), "a was evicted before min_residency"
        clock.now = 30.0
        with anyio.fail_after(10):
            await b.granted.wait()
        await release_all(b)
        c = call(tg, mm, "c", order, priority=5)  # b was loaded at t=30: young, but c is urgent
        with anyio.fail_after(10):
            await c.granted.wait()
        await release_all(c)


# -- 2. priorities with ageing, weighted fair shares ------------------------------------------


LIMITED = {"m": model(4, max_concurrency=1)}


async def test_higher_priority_first_and_ageing_lets_low_priority_through() -> None:
    """``m`` serves one request at a time.  Queued behind its holder, a request of priority
    5 goes before one of priority 0 that came first; but a priority-0 request that has
    waited 6 × ``ageing`` (6 levels) goes before a priority-5 one that just came."""
    clock, order = Clock(), []
    faulty = FaultyProvider()
    cfg = {"scheduling": {"ageing": 10}}
    async with faulty_manager(faulty, LIMITED, clock=clock, **cfg) as mm, anyio.create_task_group() as tg:
        holder = call(tg, mm, "m", order)
        await holder.granted.wait()
        low = call(tg, mm, "m", order, priority=0)
        await settle()
        high = call(tg, mm, "m", order, priority=5)
        await settle()
        await release_all(holder)
        with anyio.fail_after(10):
            await high.granted.wait()
        assert not low.granted.is_set()
        await release_all(high)
        with anyio.fail_after(10):
            await low.granted.wait()
        old = call(tg, mm, "m", order, priority=0)
        await settle()
        clock.now += 60.0  # old has waited 6 ageing steps: priority 6 now
        new = call(tg, mm, "m", order, priority=5)
        await settle()
        await release_all(low)
        with anyio.fail_after(10):
            await old.granted.wait()
        assert not new.granted.is_set()
        await release_all(old)
        with anyio.fail_after(10):
            await new.granted.wait()
        await release_all(new)
    assert order == [holder, high, low, old, new]


async def test_keys_share_a_busy_model_by_their_weights() -> None:
    """Weighted fair queuing between keys: ``alice`` (weight 3) and ``bob`` (weight 1) each
    queue 8 requests for ``m`` (one at a time), alternating as they come; of the first 8
    served after the holder, alice gets 6 and bob 2."""
    order: list[Caller] = []
    faulty = FaultyProvider()
    async with faulty_manager(faulty, LIMITED) as mm, anyio.create_task_group() as tg:
        holder = call(tg, mm, "m", order)
        await holder.granted.wait()
        queued = []
        for _ in range(8):
            queued.append(call(tg, mm, "m", order, key="alice", weight=3))
            queued.append(call(tg, mm, "m", order, key="bob", weight=1))
            await settle()
        await release_all(holder)
        for _ in range(len(queued)):
            with anyio.fail_after(10):
                while len(order) < 2 + len([c for c in queued if c.done.is_set()]):
                    await anyio.lowlevel.checkpoint()
                await settle()
            await release_all(order[-1])
        keys = [c.how["key"] for c in order[1:9]]
    assert keys.count("alice") == 6 and keys.count("bob") == 2, keys


# -- 3. back-pressure --------------------------------------------------------------------------


async def test_a_full_queue_is_refused_at_once_with_retry_after_in_flight_and_waiting() -> None:
    """``m`` serves one request at a time and lets two wait (``max_queue: 2``): the fourth
    caller is refused at once (Overloaded) with how many are in flight and waiting and a
    retry-after from the measured service time (two earlier leases of 8 s each: about
    (2 + 1) × 8 s); with ``max_wait: 20``, on ``n`` (no queue bound) a third caller in line
    would wait 3 × 8 s and is refused too."""
    from modelmora import Overloaded  # new in issue 25

    clock, order = Clock(), []
    faulty = FaultyProvider()
    models = {"m": model(4, max_concurrency=1, max_queue=2), "n": model(4, max_concurrency=1)}
    cfg = {"scheduling": {"max_wait": 20}}
    async with faulty_manager(faulty, models, clock=clock, **cfg) as mm, anyio.create_task_group() as tg:
        for name in ("m", "n"):
            for _ in range(2):  # measure the service time: 8 s per lease
                async with mm.use(name):
                    clock.now += 8.0
        holder = call(tg, mm, "m", order)
        await holder.granted.wait()
        queued = [call(tg, mm, "m", order) for _ in range(2)]
        await settle()
        with pytest.raises(Overloaded) as refused:
            async with mm.use("m"):
                pass
        exc = refused.value
        assert (exc.in_flight, exc.waiting) == (1, 2), exc
        assert 16.0 <= exc.retry_after <= 32.0, exc
        n_holder = call(tg, mm, "n", order)
        await n_holder.granted.wait()
        n_queued = [call(tg, mm, "n", order) for _ in range(2)]  # the second would wait 2 × 8 s: fine
        await settle()
        assert not any(c.done.is_set() for c in n_queued), n_queued
        with pytest.raises(Overloaded, match="max_wait"):
            async with mm.use("n"):  # would wait 3 × 8 s, past max_wait
                pass
        await release_all(holder)
        for c in queued:
            with anyio.fail_after(10):
                await c.granted.wait()
            await release_all(c)
        await release_all(n_holder, *n_queued)
