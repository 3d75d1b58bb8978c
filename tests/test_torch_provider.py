"""The torch provider with real models on the CPU: the packaged all-MiniLM-L6-v2, a tiny
GPT-2 made locally, and a diffusers-shaped factory."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch", reason="the torch extra is not installed (pip install 'modelmora[torch]')")

from modelmora import HandleClosed, ModelManager, ModelMoraError, ModelNotFound
from modelmora.memory import StaticProbe
from modelmora.providers import torch_pool
from modelmora.providers.torch import IsolatedHandle, TorchProvider
from modelmora.testing.models import make_tiny_causal_lm, minilm_path

pytestmark = [pytest.mark.anyio, pytest.mark.torch]
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
MINILM = {
    "provider": "torch",
    "target": str(minilm_path()),
    "device": "cpu",
    "memory": "100MB",
    "options": {"kind": "sentence-transformers"},
}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm")))


def manager(models: dict[str, Any], provider: TorchProvider | None = None, **cfg: Any) -> ModelManager:
    providers = {"torch": provider} if provider is not None else None
    return ModelManager({"models": models, **cfg}, providers=providers, probe=StaticProbe({}))


async def test_minilm_load_infer_unload_and_reclaim() -> None:
    provider = TorchProvider()
    async with manager({"minilm": MINILM}, provider) as mm:
        async with mm.use("minilm") as handle:
            vectors = handle.obj.encode(["modelmora keeps models resident", "a second sentence"])
            assert vectors.shape == (2, 384)
            # parameters of the real model: 22.7 M floats
            assert 80_000_000 < handle.memory["cpu"] < 100_000_000
        freed: list[dict[str, int]] = []
        mm.events.subscribe(lambda e: freed.append(e.freed) if e.kind == "Unloaded" else None)  # type: ignore[attr-defined]
        assert await mm.unload("minilm")
        assert provider.leaks == {}
        assert freed and "cpu" in freed[0]
        with pytest.raises(HandleClosed, match="take a new lease"):
            _ = handle.obj


async def test_tiny_causal_lm_generates(tiny_lm: str) -> None:
    models = {
        "tiny": {
            "provider": "torch",
            "target": tiny_lm,
            "device": "cpu",
            "options": {"auto_class": "AutoModelForCausalLM"},
        }
    }
    async with manager(models) as mm, mm.use("tiny") as handle:
        tokenizer = handle.extras["tokenizer"]
        ids = tokenizer("The quick", return_tensors="pt").input_ids
        out = handle.obj.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert out.shape[1] == ids.shape[1] + 4
        assert handle.kind == "transformers"


async def test_factory_loader_for_diffusers_shaped_pipelines() -> None:
    models = {
        "sdxl": {
            "provider": "torch",
            "target": "modelmora.testing.models:tiny_image_pipeline",
            "device": "cpu",
            "options": {"kwargs": {"size": 16}},
        }
    }
    async with manager(models) as mm, mm.use("sdxl") as handle:
        [image] = handle.obj("a lighthouse at dusk")
        assert tuple(image.shape) == (1, 3, 16, 16)
        assert handle.memory["cpu"] > 0


async def test_a_leaked_reference_is_reported_by_name() -> None:
    provider = TorchProvider()
    async with manager({"minilm": MINILM}, provider) as mm:
        async with mm.use("minilm") as handle:
            kept = handle.obj  # the user keeps the model beyond its lease
        await mm.unload("minilm")
        assert "minilm" in provider.leaks and provider.leaks["minilm"] >= 1
        del kept
        gc.collect()


async def test_missing_local_model_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    models = {"ghost": {"provider": "torch", "target": "no-such-org/no-such-model", "device": "cpu"}}
    async with manager(models) as mm:
        with (
            anyio.fail_after(60),
            pytest.raises(ModelNotFound, match="cannot find 'no-such-org/no-such-model' locally"),
        ):
            await mm.load("ghost")
        assert mm.loaded() == []


async def test_offload_and_wake_through_the_manager() -> None:
    async with manager({"minilm": {**MINILM, "warm_tier": True}}) as mm:
        await mm.load("minilm")
        assert await mm.park("minilm") and mm.is_parked("minilm")
        async with mm.use("minilm") as handle:  # wakes it, no reload
            assert handle.obj.encode(["back"]).shape == (1, 384)
        assert not mm.is_parked("minilm")


async def test_isolated_worker_serves_calls_and_a_killed_worker_is_a_clear_error() -> None:
    """Issue 18: SIGKILL while leased: the holder is told the worker died, the model leaves
    the table at once with a Vanished event, comes back on the next use, and no zombie."""
    models = {"minilm": {**MINILM, "options": {"kind": "sentence-transformers", "isolation": "process"}}}
    async with TorchProvider() as provider, manager(models, provider) as mm:
        vanished: list[Any] = []
        mm.events.subscribe(lambda e: vanished.append(e) if e.kind == "Vanished" else None)  # type: ignore[attr-defined]
        async with mm.use("minilm") as handle:
            assert isinstance(handle, IsolatedHandle)
            vectors = await handle.call("encode", ["isolated"])
            assert vectors.shape == (1, 384)
            with pytest.raises(ModelMoraError, match="isolated worker process"):
                _ = handle.obj
            pid = handle.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            with anyio.fail_after(30), pytest.raises(ModelMoraError, match=r"died \(killed by signal 9\)"):
                await handle.call("encode", ["after the kill"])
            with anyio.fail_after(10):
                while not vanished:  # the watch, not a reconcile, noticed it
                    await anyio.sleep(0.01)
            assert mm.loaded() == [] and mm.entries() == []
        assert [e.model for e in vanished] == ["minilm"]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert not psutil.pid_exists(pid), "the killed worker is still in the process table"
        async with mm.use("minilm") as again:  # reloaded on the next use
            assert isinstance(again, IsolatedHandle) and again.pid != pid
            assert (await again.call("encode", ["back"])).shape == (1, 384)


ECHO = {
    "provider": "torch",
    "target": "modelmora.testing.models:echo_model",
    "device": "cpu",
    "memory": "10MB",
    "options": {"isolation": "process"},
}


async def test_a_cancelled_caller_leaves_no_answer_for_the_next_one() -> None:
    """Issue 18: caller A gives up on a 0.5 s call after 0.1 s; caller B must get B's answer,
    not A's (through /v1/embeddings that was one client receiving another's embeddings)."""
    async with manager({"echo": ECHO}) as mm, mm.use("echo") as handle:
        assert isinstance(handle, IsolatedHandle)
        with anyio.move_on_after(0.1):
            await handle.call("echo", "answer for A", 0.5)
        with anyio.fail_after(30):
            assert await handle.call("echo", "answer for B") == "answer for B"
        assert handle._worker is not None and handle._worker.discarded == 1  # A's, read and dropped


def test_a_script_without_a_main_guard_is_not_rerun_in_its_workers(tmp_path: Path) -> None:
    """multiprocessing re-runs the parent's __main__ in each child; an unguarded script
    would start its manager again inside every model worker.  Ours do not."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import anyio\n"
        "from modelmora import ModelManager\n"
        "from modelmora.memory import StaticProbe\n"
        f"models = {{'echo': {ECHO!r}}}\n"
        "async def main():\n"
        "    async with ModelManager({'models': models}, probe=StaticProbe({})) as mm, mm.use('echo') as h:\n"
        "        print('answer:', await h.call('echo', 'hello'))\n"
        "print('script body ran')\n"
        "anyio.run(main)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("script body ran") == 1 and "answer: hello" in result.stdout, result.stdout


@pytest.fixture
def fork_server() -> Iterator[None]:
    """Keep the fork server up across a property test's examples (each closes its provider;
    a function-scoped fixture runs once for all the examples of a test)."""
    torch_pool.acquire()
    yield
    torch_pool.release()


CALLERS = st.lists(
    st.tuples(
        st.floats(0, 0.04),  # how long the model takes for this caller
        st.none() | st.floats(0, 0.06),  # when the caller gives up (None: it waits)
        st.floats(0, 0.02),  # when the caller starts
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(callers=CALLERS)
async def test_every_caller_gets_its_own_answer_under_random_cancellation(
    fork_server: None, callers: list[tuple[float, float | None, float]]
) -> None:
    """Issue 18: many concurrent callers of one isolated model, each cancelled at a random
    point (waiting for the lock, after sending, while the model runs, or never): every
    caller that gets an answer gets its own, and the worker is in step afterwards."""
    got: dict[int, Any] = {}

    async def caller(
        handle: IsolatedHandle, i: int, delay: float, give_up: float | None, start: float
    ) -> None:
        await anyio.sleep(start)
        with anyio.move_on_after(give_up if give_up is not None else 60):
            got[i] = await handle.call("echo", f"answer {i}", delay)

    async with manager({"echo": ECHO}) as mm, mm.use("echo") as handle:
        assert isinstance(handle, IsolatedHandle)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i, (delay, give_up, start) in enumerate(callers):
                    tg.start_soon(caller, handle, i, delay, give_up, start)
            assert all(answer == f"answer {i}" for i, answer in got.items()), got
            assert {i for i, (_, give_up, _) in enumerate(callers) if give_up is None} <= got.keys()
            assert await handle.call("echo", "last") == "last"


async def test_unload_of_an_isolated_model_ends_its_process() -> None:
    """Unload ends the worker (reaped: gone from the process table); its memory was measured
    by the parent, at least the weights' 90.9 MB, not the ~300 MB of torch it shares with
    the fork server; a closed manager leaves no fork server behind."""
    models = {"minilm": {**MINILM, "options": {"kind": "sentence-transformers", "isolation": "process"}}}
    async with manager(models) as mm:
        handle = await mm.load("minilm")
        assert isinstance(handle, IsolatedHandle)
        pid = handle.pid
        assert pid is not None and psutil.pid_exists(pid)
        assert 90_000_000 <= handle.memory["cpu"] < 250_000_000, handle.memory
        await mm.unload("minilm")
        with anyio.fail_after(10):
            while psutil.pid_exists(pid):
                await anyio.sleep(0.01)
    children = psutil.Process().children(recursive=True)
    assert all("multiprocessing.forkserver" not in " ".join(c.cmdline()) for c in children)


def test_core_imports_without_torch() -> None:
    code = "import sys, modelmora, modelmora.providers.torch, modelmora.cli; assert 'torch' not in sys.modules, 'imported torch'"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
async def test_twenty_cycles_in_process_vs_isolated() -> None:
    """Isolation must come back within 10 MB of the baseline; in-process growth is reported."""
    growth: dict[str, int] = {}
    for mode, options in (
        ("in-process", {"kind": "sentence-transformers"}),
        ("isolated", {"kind": "sentence-transformers", "isolation": "process"}),
    ):
        async with manager({"minilm": {**MINILM, "options": options}}) as mm:
            await mm.load("minilm")  # libraries imported once, outside the measurement
            await mm.unload("minilm")
            gc.collect()
            baseline = psutil.Process().memory_info().rss
            for _ in range(20):
                handle = await mm.load("minilm")
                if isinstance(handle, IsolatedHandle):
                    await handle.call("encode", ["x"])
                else:
                    handle.obj.encode(["x"])
                await mm.unload("minilm")
            gc.collect()
            growth[mode] = psutil.Process().memory_info().rss - baseline
    print(f"\nRSS growth after 20 MiniLM load/unload cycles: {growth}")
    assert growth["isolated"] < 10_000_000, growth


@pytest.mark.gpu
async def test_cuda_placement_and_release() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    provider = TorchProvider()
    async with manager({"minilm": {**MINILM, "device": "cuda:0"}}, provider) as mm:
        handle = await mm.load("minilm")
        assert handle.memory["cuda:0"] > 0 and torch.cuda.memory_allocated(0) > 0
        await mm.unload("minilm")
        assert torch.cuda.memory_allocated(0) < 1_000_000
