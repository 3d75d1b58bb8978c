"""Issue 15, liveness (failures 12-14): a provider's exception never kills the manager,
``unload_all`` attempts every model, and nothing slow runs on the event loop."""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from typing import Any

import anyio
import httpx
import pytest

from modelmora import ModelManager, ModelMoraError, UnloadFailed
from modelmora.chain import Chain, Step
from modelmora.memory import StaticProbe
from modelmora.providers.torch import TorchProvider
from modelmora.server import create_app
from modelmora.testing.faulty import FaultyProvider
from modelmora.testing.threaded import ThreadedServer

from .support import GB, faulty_manager, model

pytestmark = pytest.mark.anyio

FOREIGN = {
    "observe": OSError("cannot read the provider's state file"),
    "adopt": httpx.ConnectError("connection refused"),
    "refresh": ConnectionResetError("connection reset by peer"),
}


# -- 12. one provider exception kills the manager ----------------------------------------------


@pytest.mark.parametrize("op", sorted(FOREIGN))
async def test_12_a_foreign_exception_in_background_work_does_not_kill_the_manager(op: Any) -> None:
    faulty = FaultyProvider()
    mm = faulty_manager(faulty, {"a": model(4)}, reaper_interval=0.01, reconcile_interval=0.01)
    died: BaseExceptionGroup[Any] | None = None
    try:
        async with mm:
            await mm.load("a")  # a ready, owned model: the reaper refreshes its keep-alive
            if op == "adopt":
                faulty.add_foreign("f", {"cuda:0": GB})  # found by the next reconcile
            before = len([c for c in faulty.calls if c.op == op])
            faulty.fail_next(op, error=FOREIGN[op])
            with anyio.fail_after(10):
                await faulty.wait_calls(op, count=before + 2)  # failed once, then carried on
            async with mm.use("a"):
                pass
    except* (OSError, httpx.HTTPError) as group:
        died = group
    assert died is None, (
        f"a {type(FOREIGN[op]).__name__} from {op}() killed the manager and cancelled the code inside "
        f"`async with`: {died.exceptions!r}"
    )


def test_12_health_says_degraded_while_background_work_fails() -> None:
    faulty = FaultyProvider()
    mm = faulty_manager(faulty, {"a": model(4)}, reaper_interval=0.01, reconcile_interval=0.01)
    server = ThreadedServer(create_app(mm)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert http.get("/health").status_code == 200
            before = len(faulty.calls)
            faulty.fail_always("observe", error=OSError("cannot read the provider's state file"))
            deadline = time.monotonic() + 10
            while not [c for c in faulty.calls[before:] if c.op == "observe"]:
                assert time.monotonic() < deadline, "the reaper never observed"
                time.sleep(0.01)
            deadline = time.monotonic() + 5  # generous: the next answer after the failure will do
            while (health := http.get("/health")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert health.status_code == 503, (
                f"/health answers {health.status_code} {health.json()} while observe() fails"
            )
            assert health.json()["status"] == "degraded"
            assert "state file" in str(health.json()), health.json()
            faulty.heal()
            loaded = http.post("/models/a/load")
            assert loaded.status_code == 200, loaded.text  # the manager itself still works
    finally:
        server.stop()


def test_12_degraded_health_lists_the_problems_only_to_the_token() -> None:
    """503 ``degraded`` for everyone; the problem texts (which may name models) only with the
    token, as /health names no models without it."""
    faulty = FaultyProvider()
    mm = faulty_manager(faulty, {"a": model(4)}, reaper_interval=0.01, reconcile_interval=0.01)
    server = ThreadedServer(create_app(mm, token="s3cret")).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            faulty.fail_always("observe", error=OSError("cannot read the provider's state file"))
            deadline = time.monotonic() + 10
            while (health := http.get("/health")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert health.status_code == 503, health.json()
            assert health.json() == {"status": "degraded"}
            full = http.get("/health", headers={"Authorization": "Bearer s3cret"})
            assert full.status_code == 503
            assert full.json()["status"] == "degraded"
            assert "state file" in str(full.json()["problems"]), full.json()
            faulty.heal()
    finally:
        server.stop()


# -- 13. unload_all stops at the first failure -------------------------------------------------


async def test_13_unload_all_attempts_every_model_and_lists_the_failures() -> None:
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"a": model(2), "b": model(2), "c": model(2)}) as mm:
        for name in "abc":
            await mm.load(name)
        faulty.fail_next("unload", "a", UnloadFailed("the runtime would not let go of a"))
        result = None
        with contextlib.suppress(ModelMoraError):
            result = await mm.unload_all()
        left = sorted(faulty.instances)
        assert left == ["a"], f"unload_all stopped at the first failure: {left} still loaded"
        assert result is not None, "unload_all raised instead of reporting the failure"
        assert sorted(result.unloaded) == ["b", "c"]
        assert list(getattr(result, "failed", {})) == ["a"]


async def test_13_unload_on_exit_attempts_every_model() -> None:
    faulty = FaultyProvider()
    mm = faulty_manager(faulty, {"a": model(2), "b": model(2), "c": model(2)}, unload_on_exit=True)
    try:
        async with mm:
            for name in "abc":
                await mm.load(name)
            faulty.fail_next("unload", "a", UnloadFailed("the runtime would not let go of a"))
    except* ModelMoraError:
        pass  # reporting the failure on exit is fine; stopping at it is not
    assert sorted(faulty.instances) == ["a"], f"left loaded after exit: {sorted(faulty.instances)}"


# -- 14. blocking the event loop ---------------------------------------------------------------


async def test_14_parking_a_torch_model_collects_garbage_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = {
        "provider": "torch", "target": "collections:OrderedDict", "device": "cpu", "memory": "1MB",
        "warm_tier": True, "options": {"kind": "factory"},
    }  # fmt: skip
    async with ModelManager(
        {"budgets": {"cpu": "1GB"}, "reaper_interval": 3600, "models": {"w": spec}},
        providers={"torch": TorchProvider()},
        probe=StaticProbe({}),
    ) as mm:
        await mm.load("w")
        loop_thread = threading.get_ident()
        threads: list[str] = []
        collect = gc.collect
        from modelmora.providers import torch_loaders

        trim = torch_loaders.trim_malloc

        def collect_spy(*args: Any) -> int:
            threads.append("gc.collect on the loop" if threading.get_ident() == loop_thread else "worker")
            return collect(*args)

        def trim_spy() -> None:
            threads.append("malloc_trim on the loop" if threading.get_ident() == loop_thread else "worker")
            trim()

        monkeypatch.setattr(gc, "collect", collect_spy)
        monkeypatch.setattr(torch_loaders, "trim_malloc", trim_spy)
        assert await mm.park("w")
        monkeypatch.undo()
    assert not [t for t in threads if t != "worker"], f"parking stalls the event loop: {threads}"


async def test_14_chain_plan_runs_the_planner_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelmora.chain import executor

    faulty = FaultyProvider()
    async with faulty_manager(faulty, {n: model(6) for n in "abc"}) as mm:
        chain = Chain([Step(model=n) for n in "abcab"], manager=mm)
        loop_thread = threading.get_ident()
        threads: list[bool] = []
        plan = executor.plan_residency

        def spy(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.get_ident() == loop_thread)
            return plan(*args, **kwargs)

        monkeypatch.setattr(executor, "plan_residency", spy)
        await chain.plan()
    assert threads and not any(threads), "Chain.plan() runs the exact planner on the event loop"
