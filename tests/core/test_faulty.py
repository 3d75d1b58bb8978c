"""The fault-injecting runtime itself: what the regression and stateful tests rely on."""

from __future__ import annotations

import anyio
import httpx
import pytest

from modelmora import Handle, LoadFailed, ModelSpec
from modelmora.providers.base import Tier
from modelmora.testing.faulty import FaultyProvider, gb, injected_error, truth_table

pytestmark = pytest.mark.anyio


def spec(name: str, size: float = 4, **extra: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "provider": "faulty", "memory": f"{size}GB", **extra})


async def test_a_held_load_commits_its_memory_and_finishes_when_released() -> None:
    faulty = FaultyProvider()
    faulty.hold("load", "a")
    handles: list[Handle] = []
    async with anyio.create_task_group() as tg:

        async def load() -> None:
            handles.append(await faulty.load(spec("a", 4)))

        tg.start_soon(load)
        (call,) = await faulty.wait_pending("load", "a")
        assert faulty.held() == {} and faulty.committed() == {"cuda:0": gb(4)}
        assert call.committed == {"cuda:0": gb(4)}
        faulty.release("load", "a")
    assert faulty.held() == {"cuda:0": gb(4)} and faulty.pending == []
    assert faulty.instance_of(handles[0]) is faulty.instances["a"]


async def test_failures_modelmora_or_foreign_leave_nothing_behind() -> None:
    faulty = FaultyProvider()
    faulty.fail_next("load", "a", injected_error("oserror"))
    with pytest.raises(OSError):
        await faulty.load(spec("a"))
    faulty.hold("load", "a")
    async with anyio.create_task_group() as tg:

        async def load() -> None:
            with pytest.raises(httpx.ConnectError):
                await faulty.load(spec("a"))

        tg.start_soon(load)
        await faulty.wait_pending("load", "a")
        faulty.release("load", "a", error=injected_error("connect"))
    assert faulty.instances == {} and [c.outcome.split(":")[0] for c in faulty.calls] == ["failed"] * 2
    faulty.fail_always("observe", error=OSError("gone"))
    for _ in range(2):
        with pytest.raises(OSError):
            await faulty.observe()
    faulty.heal()
    assert await faulty.observe() == []


async def test_sleep_wake_and_the_probe_follow_the_truth() -> None:
    faulty = FaultyProvider(devices={"cuda:0": gb(24)})
    handle = await faulty.load(spec("a", 8))
    faulty.external["cuda:0"] = gb(2)
    assert [(r.used, r.free) for r in faulty.probe.read()] == [(gb(10), gb(14))]
    assert await faulty.sleep(handle) == {"cpu": gb(8)}  # nothing left on the GPU
    assert faulty.instances["a"].tier is Tier.SLEEPING
    assert faulty.probe.read()[0].used == gb(2)
    faulty.hold("wake", "a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(faulty.wake, handle)
        await faulty.wait_pending("wake", "a")
        assert faulty.committed() == {"cuda:0": gb(8), "cpu": 0}
        faulty.release()
    assert faulty.held() == {"cuda:0": gb(8)} and faulty.peak == {"cuda:0": gb(8), "cpu": gb(8)}


async def test_a_held_observe_answers_what_was_true_when_it_was_asked() -> None:
    faulty = FaultyProvider()
    await faulty.load(spec("a"))
    faulty.hold("observe")
    answers = []
    async with anyio.create_task_group() as tg:

        async def observe() -> None:
            answers.append(await faulty.observe())

        tg.start_soon(observe)
        await faulty.wait_pending("observe")
        faulty.evict("a")
        faulty.release("observe")
    assert [o.target for o in answers[0]] == ["a"] and faulty.instances == {}


async def test_aliases_foreign_models_and_crashes() -> None:
    faulty = FaultyProvider()
    handle = await faulty.load(spec("x"))
    faulty.alias("x", "x:latest")
    assert [o.target for o in await faulty.observe()] == ["x:latest"]
    assert faulty.target_key("x") == faulty.target_key("x:latest") == "x:latest"
    faulty.add_foreign("f", {"cuda:0": gb(3)}, tier=Tier.SLEEPING)
    assert truth_table(faulty)["f"] == (Tier.SLEEPING, {"cpu": gb(3)})
    adopted = await faulty.adopt((await faulty.observe())[1], spec("f"))
    assert not adopted.owned and faulty.instance_of(adopted) is faulty.instances["f"]
    lost: list[tuple[Handle, str]] = []
    faulty.report_lost = lambda h, reason: lost.append((h, reason))  # type: ignore[attr-defined]
    await faulty.crash("x:latest")
    assert lost == [(handle, "the runtime crashed")] and "x" not in faulty.instances
    with pytest.raises(LoadFailed):
        await faulty.sleep(handle)


async def test_a_load_failing_partway_leaves_the_model_held_and_unlent() -> None:
    faulty = FaultyProvider()
    faulty.fail_partway("a")
    with pytest.raises(LoadFailed, match="partway"):
        await faulty.load(spec("a", 4))
    instance = faulty.instances["a"]
    assert faulty.held() == {"cuda:0": gb(4)} and instance.lent == 0 and instance.born > 0
    (seen,) = await faulty.observe()
    await faulty.unload(await faulty.adopt(seen, spec("a", 4)))  # Provider.discard's default
    assert faulty.instances == {}


async def test_a_crash_that_answered_still_finishes_the_pending_sleep() -> None:
    faulty = FaultyProvider()
    handle = await faulty.load(spec("a", 4))
    faulty.hold("sleep", "a")
    slept: list[dict[str, int]] = []
    async with anyio.create_task_group() as tg:

        async def sleep() -> None:
            slept.append(await faulty.sleep(handle))

        tg.start_soon(sleep)
        await faulty.wait_pending("sleep", "a")
        await faulty.crash("a", answered=True)
        faulty.release("sleep", "a")
    assert slept == [{"cpu": gb(4)}] and faulty.instances == {} and faulty.held() == {}


async def test_leaks_are_read_by_the_probe_and_reported_and_sleepers_say_their_awake_size() -> None:
    faulty = FaultyProvider(devices={"cuda:0": gb(24)})
    faulty.leaks["cuda:0"] = gb(2)
    assert faulty.leaked() == {"cuda:0": gb(2)}
    assert faulty.probe.read()[0].used == gb(2)
    faulty.add_foreign("f", {"cuda:0": gb(3)}, tier=Tier.SLEEPING)
    (seen,) = await faulty.observe()
    assert seen.awake == {"cuda:0": gb(3)} and seen.memory == {"cpu": gb(3)}
    faulty.report_awake = False
    (seen,) = await faulty.observe()
    assert seen.awake == {}


async def test_surprise_is_what_pending_loads_take_beyond_their_estimate() -> None:
    faulty = FaultyProvider()
    faulty.measure("a", {"cuda:0": gb(6)})
    faulty.hold("load", "a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(faulty.load, spec("a", 4))
        (call,) = await faulty.wait_pending("load", "a")
        assert call.surprise == {"cuda:0": gb(2)} and faulty.surprise() == {"cuda:0": gb(2)}
        faulty.release("load", "a")
    assert faulty.surprise() == {}
