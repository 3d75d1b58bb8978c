"""Issue 23, item 5: a load that runs out of memory anyway raises the model's estimate,
evicts idle models on its device as the planner chooses, and is retried once — never
twice; a second out-of-memory gives the caller one clear error naming the device, the
estimate and what was free."""

from __future__ import annotations

import contextlib

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelmora import InsufficientMemory, LoadFailed, OutOfMemory
from modelmora import events as ev
from modelmora.oom import out_of_memory
from modelmora.testing.faulty import FaultyProvider

from .support import GB, Events, faulty_manager, model, overcommits

pytestmark = pytest.mark.anyio

BUDGETS = {"cuda:0": 16 * GB}

MESSAGES = {
    "torch": "CUDA out of memory. Tried to allocate 4.00 GiB. GPU 0 has a total capacity of 16 GiB "
    "of which 2.00 GiB is free.",
    "llama.cpp": "llama-server exited: failed to allocate CUDA0 buffer of size 4000000000",
    "ggml": "allocating 3814.70 MiB on device 0: cudaMalloc failed: out of memory",
    "vllm": "No available memory for the cache blocks. Try increasing `gpu_memory_utilization`",
    "ollama": "model requires more system memory (12.0 GiB) than is available (8.0 GiB)",
}


class OutOfMemoryError(RuntimeError):
    """Named as torch.cuda.OutOfMemoryError is."""


def oom(runtime: str) -> BaseException:
    return LoadFailed(MESSAGES[runtime], provider="faulty")


def loads(faulty: FaultyProvider, target: str) -> int:
    return len([c for c in faulty.calls if c.op == "load" and c.target == target])


@pytest.mark.parametrize("runtime", sorted(MESSAGES))
def test_the_classifier_knows_each_runtime(runtime: str) -> None:
    assert out_of_memory(oom(runtime)) is not None
    assert out_of_memory(OutOfMemoryError("boom")) is not None
    assert out_of_memory(LoadFailed("connection refused")) is None
    torch = out_of_memory(oom("torch"))
    assert torch is not None and torch.needed == 4 * 2**30 and torch.free == 2 * 2**30


@pytest.mark.parametrize("runtime", sorted(MESSAGES))
async def test_an_oom_raises_the_estimate_evicts_an_idle_model_and_retries_once(runtime: str) -> None:
    faulty = FaultyProvider()
    models = {"idle": model(7), "big": model(8)}
    async with faulty_manager(faulty, models) as mm:
        events = Events(mm)
        async with mm.use("idle"):
            pass
        faulty.fail_next("load", "big", oom(runtime))
        async with mm.use("big"):
            assert "idle" not in faulty.instances  # evicted to make room for the raised estimate
            assert "big" in faulty.instances
        assert loads(faulty, "big") == 2
        retries = events.of(ev.OutOfMemoryRetry, "big")
        assert len(retries) == 1
        assert retries[0].raised["cuda:0"] > retries[0].estimate["cuda:0"] == 8 * GB
        assert events.of(ev.Evicted, "idle")
        assert not events.of(ev.LoadFailed, "big")
        assert overcommits(faulty, BUDGETS) == []


async def test_the_raised_estimate_follows_the_rule_and_stays_until_measured() -> None:
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"big": model(8), "other": model(1)}) as mm:
        events = Events(mm)
        faulty.fail_next("load", "big", oom("vllm"), times=2)  # says nothing of sizes: ×1.25
        with pytest.raises(OutOfMemory):
            await mm.load("big", retry=True)
        (retry,) = events.of(ev.OutOfMemoryRetry, "big")
        assert retry.raised["cuda:0"] == 10 * GB
        faulty.fail_next("load", "big", oom("torch"))  # tried to allocate 4 GiB more
        await mm.load("big", retry=True)
        second = events.of(ev.OutOfMemoryRetry, "big")[-1]
        assert second.estimate["cuda:0"] == 10 * GB  # the raised estimate stayed for the next load
        assert second.raised["cuda:0"] == 10 * GB + 4 * 2**30
        loading = events.of(ev.Loading, "big")
        assert loading[-1].estimate["cuda:0"] == 10 * GB + 4 * 2**30
        assert overcommits(faulty, BUDGETS) == []


async def test_a_second_oom_is_one_clear_error_after_exactly_two_loads() -> None:
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"big": model(8)}) as mm:
        events = Events(mm)
        faulty.fail_always("load", "big", oom("torch"))
        with pytest.raises(OutOfMemory) as caught:
            async with mm.use("big"):
                pass
        error = caught.value
        assert loads(faulty, "big") == 2  # never a third
        assert error.device == "cuda:0" and error.free == 2 * 2**30
        assert error.estimate == 8 * GB + 4 * 2**30
        assert "cuda:0" in str(error) and "free" in str(error) and "reserved" in str(error)
        assert len(events.of(ev.OutOfMemoryRetry, "big")) == 1
        assert len(events.of(ev.LoadFailed, "big")) == 1
        assert "big" not in faulty.instances


async def test_a_failure_that_is_not_out_of_memory_is_not_retried() -> None:
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"big": model(8)}) as mm:
        events = Events(mm)
        faulty.fail_next("load", "big", LoadFailed("faulty runtime: the file is corrupt"))
        with pytest.raises(LoadFailed) as caught:
            async with mm.use("big"):
                pass
        assert not isinstance(caught.value, OutOfMemory)
        assert loads(faulty, "big") == 1
        assert not events.of(ev.OutOfMemoryRetry)


async def test_an_oom_that_cannot_fit_once_raised_is_refused_not_loaded_again() -> None:
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"big": model(14)}) as mm:
        faulty.fail_next("load", "big", oom("torch"))  # 14 GB + 4 GiB > 16 GB: can never fit
        with pytest.raises(Exception) as caught:
            async with mm.use("big"):
                pass
        assert "big" in str(caught.value)
        assert loads(faulty, "big") == 1
        assert overcommits(faulty, BUDGETS) == []


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=4))
def test_never_more_than_two_loads_per_attempt(outcomes: list[bool]) -> None:
    """Whatever sequence of OOMs (True) and successes the runtime answers, each attempt
    calls load at most twice."""

    async def main() -> None:
        faulty = FaultyProvider()
        async with faulty_manager(faulty, {"big": model(4), "idle": model(4)}) as mm:
            async with mm.use("idle"):
                pass
            for fails in outcomes:
                before = loads(faulty, "big")
                if fails:
                    faulty.fail_always("load", "big", oom("ollama"))
                else:
                    faulty.fail_next("load", "big", oom("ggml"))
                with contextlib.suppress(OutOfMemory, InsufficientMemory):  # raised past the budget
                    await mm.load("big", retry=True)
                faulty.heal()
                assert loads(faulty, "big") - before <= 2
                await mm.unload("big")
            assert overcommits(faulty, BUDGETS) == []

    anyio.run(main)
