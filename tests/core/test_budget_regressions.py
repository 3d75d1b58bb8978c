"""Issue 15, budget and accounting (failures 1-5), head-of-line blocking and starvation:
concurrent loads never overcommit a budget, and a load that can go is never held back.

Each test fails on the manager before the core rebuild for the reason the issue gives."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from modelmora import ConfigError, ModelManager, ModelMoraError
from modelmora import events as ev
from modelmora.memory import StaticProbe
from modelmora.testing.faulty import FaultyProvider, gb
from modelmora.testing.ollama import OllamaEmulator

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


# -- 4. memory a leaked torch model holds ------------------------------------------------------


@pytest.mark.torch
async def test_04_memory_a_leaked_torch_model_still_holds_stays_counted() -> None:
    pytest.importorskip("torch")
    from modelmora.providers.torch import TorchProvider

    linear = {  # 4096 x 4096 float32 weights: 67 MB
        "provider": "torch", "target": "torch.nn:Linear", "device": "cpu", "memory": "67MB",
        "options": {"kind": "factory", "kwargs": {"in_features": 4096, "out_features": 4096}},
    }  # fmt: skip
    torch = TorchProvider()
    async with ModelManager(
        {"budgets": {"cpu": "100MB"}, "reaper_interval": 3600, "models": {"a": linear, "b": linear}},
        providers={"torch": torch},
        probe=StaticProbe({}),
    ) as mm:
        async with mm.use("a") as handle:
            kept = handle.obj  # a caller keeps a reference past its lease
        await mm.unload("a")
        assert "a" in torch.leaks  # reported, and its 67 MB cannot come back
        verdict = mm.plan("b")
        del kept
    assert type(verdict).__name__ != "Admit", (
        f"with a's leaked 67 MB still held, b (67 MB) is admitted to a 100 MB CPU budget: {verdict!r}"
    )


# -- 5. two registry names on one Ollama target with different runner options -----------------


def _two_contexts(emu: OllamaEmulator, **extra: Any) -> dict[str, Any]:
    def qwen(num_ctx: int, memory: str) -> dict[str, Any]:
        return {
            "provider": "ollama",
            "target": "qwen2.5:14b",
            "memory": memory,
            "options": {"num_ctx": num_ctx},
        }

    return {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}},
        "reaper_interval": 3600,
        "reconcile_interval": 3600,
        "models": {"qwen-8k": qwen(8192, "10GB"), "qwen-32k": qwen(32768, "13GB")},
        **extra,
    }


async def test_05_two_names_for_one_ollama_runner_are_never_both_counted(
    make_ollama: Callable[..., OllamaEmulator],
) -> None:
    emu = make_ollama(models={"qwen2.5:14b": "9GB"}, vram="24GB")
    try:
        async with ModelManager(_two_contexts(emu), probe=StaticProbe({})) as mm:
            await mm.load("qwen-8k")
            await mm.load("qwen-32k")  # Ollama reloads its one qwen2.5:14b runner with 32k context
            await mm.reconcile()
            loaded, used = mm.loaded(), mm.usage()
    except ConfigError:
        return  # refusing the pair with one clear line is a fine answer
    assert len(loaded) == 1, (
        f"{loaded} both count as loaded ({used['cuda:0'] / GB:g} GB) while Ollama holds one runner: "
        f"{emu.loaded()}"
    )


async def test_05_two_names_for_one_ollama_runner_cause_no_idle_reloads(
    make_ollama: Callable[..., OllamaEmulator],
) -> None:
    emu = make_ollama(models={"qwen2.5:14b": "9GB"}, vram="24GB")
    config = _two_contexts(emu, reaper_interval=0.01, reconcile_interval=0.02)
    try:
        async with ModelManager(config, probe=StaticProbe({})) as mm:
            await mm.load("qwen-8k")
            await mm.load("qwen-32k")
            reloads, refreshes = emu.stats.reloads, len(emu.requests("/api/generate"))
            with anyio.fail_after(10):  # no traffic: just the keep-alive refreshes of a few intervals
                while len(emu.requests("/api/generate")) < refreshes + 6:
                    await anyio.sleep(0.01)
    except ConfigError:
        return
    assert emu.stats.reloads == reloads, (
        f"Ollama reloaded qwen2.5:14b {emu.stats.reloads - reloads} times with no traffic: the keep-alive "
        "refreshes alternate the two names' runner options"
    )
