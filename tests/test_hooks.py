"""Lifecycle hooks, the start-up preload and the baseline model (issue 26, item 7)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from conftest import make_manager

from modelmora import ModelManager
from modelmora import events as ev
from modelmora.config import ManagerConfig
from modelmora.errors import ConfigError, LoadDeferred
from modelmora.hooks import HookContext
from modelmora.providers.base import Handle
from modelmora.providers.simulated import SimulatedProvider
from modelmora.spec import ModelSpec

pytestmark = pytest.mark.anyio
GB = 10**9


def record(mm: ModelManager) -> list[ev.Event]:
    seen: list[ev.Event] = []
    mm.events.subscribe(seen.append, leases=False)
    return seen


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for ``condition``; the bound only keeps a broken run from hanging."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


class WitnessProvider(SimulatedProvider):
    """The simulated runtime, noting what a file said when each load and unload began."""

    def __init__(self, witness: Path) -> None:
        super().__init__()
        self.witness = witness
        self.seen_at_load: list[str] = []
        self.seen_at_unload: list[str] = []

    def _read(self) -> str:
        return self.witness.read_text() if self.witness.exists() else ""

    async def load(self, spec: ModelSpec) -> Handle:
        self.seen_at_load.append(self._read())
        return await super().load(spec)

    async def unload(self, handle: Handle) -> dict[str, int]:
        self.seen_at_unload.append(self._read())
        return await super().unload(handle)


# -- hooks ----------------------------------------------------------------------------------


async def test_hook_commands_run_with_model_event_and_device_in_their_environment(tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    line = f'echo "$MODELMORA_EVENT $MODELMORA_MODEL $MODELMORA_DEVICE" >> {log}'
    argv = [sys.executable, "-c", f"import os; open({str(log)!r}, 'a').write('argv ' + os.environ['MODELMORA_EVENT'] + chr(10))"]  # fmt: skip
    sim = WitnessProvider(log)
    models = {"a": {"memory": "1GB", "hooks": {"after_unload": argv}}}
    hooks = {"before_load": line, "after_load": line, "before_unload": line, "after_unload": line}
    async with make_manager(sim, models, hooks=hooks) as mm:
        seen = record(mm)
        await mm.load("a")
        await until(lambda: sum(isinstance(e, ev.HookRan) for e in seen) == 2)
        await mm.unload("a")
        await until(lambda: sum(isinstance(e, ev.HookRan) for e in seen) == 5)
    # before_* finished before the runtime was called; after_* ran once it had answered
    assert sim.seen_at_load == ["before_load a cuda:0\n"]
    assert sim.seen_at_unload == ["before_load a cuda:0\nafter_load a cuda:0\nbefore_unload a cuda:0\n"]
    lines = log.read_text().splitlines()
    assert lines[:3] == ["before_load a cuda:0", "after_load a cuda:0", "before_unload a cuda:0"]
    assert sorted(lines[3:]) == ["after_unload a cuda:0", "argv after_unload"]  # global and the model's
    ran = [(e.hook, e.model) for e in seen if isinstance(e, ev.HookRan)]
    assert ("before_load", "a") in ran and ran.count(("after_unload", "a")) == 2
    assert not [e for e in seen if isinstance(e, ev.HookFailed)]


async def test_a_failing_or_hanging_hook_is_bounded_reported_and_the_load_still_succeeds(
    sim: SimulatedProvider, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pidfile = tmp_path / "pid"
    # a shell that starts a child of its own: the whole process group must go
    hang = f"echo $$ > {pidfile}; sleep 61.4242 & sleep 61.4243"
    models = {"a": {"memory": "1GB", "hooks": {"before_load": hang}}, "b": {"memory": "1GB"}}
    hooks = {"after_load": "echo oops >&2; exit 3"}
    async with make_manager(sim, models, hooks=hooks, hook_timeout=0.5) as mm:
        seen = record(mm)
        await mm.load("a")
        assert mm.is_loaded("a")
        await mm.load("b")
        await until(lambda: sum(isinstance(e, ev.HookFailed) for e in seen) == 3)
    failed = {(e.model, e.hook): e.error for e in seen if isinstance(e, ev.HookFailed)}
    assert "took longer than the hook_timeout of 500ms" in failed["a", "before_load"]
    assert "exit status 3" in failed["a", "after_load"] and "oops" in failed["a", "after_load"]
    assert "exit status 3" in failed["b", "after_load"]
    assert "before_load hook of a" in caplog.text  # logged, as a warning
    assert pidfile.exists()
    left = [
        p
        for p in psutil.process_iter(["cmdline", "status"])
        if (p.info["cmdline"] or [])[-1:] in (["61.4242"], ["61.4243"]) and p.info["status"] != "zombie"
    ]
    assert left == []


async def test_python_callables_as_hooks_sync_and_async(sim: SimulatedProvider) -> None:
    calls: list[HookContext] = []

    async def before(ctx: HookContext) -> None:
        calls.append(ctx)

    def broken(ctx: HookContext) -> None:
        raise RuntimeError(f"no {ctx.model}")

    models = {"a": {"memory": "1GB", "device": "cpu"}}
    cfg: dict[str, Any] = {"budgets": {"cpu": "4GB"}, "models": models}
    async with ModelManager(
        cfg, providers={"simulated": sim}, hooks={"before_load": before, "after_unload": [broken]}
    ) as mm:
        seen = record(mm)
        await mm.load("a")
        await mm.unload("a")
        await until(lambda: any(isinstance(e, ev.HookFailed) for e in seen))
    assert [(c.event, c.model, c.device) for c in calls] == [("before_load", "a", "cpu")]
    failed = [e for e in seen if isinstance(e, ev.HookFailed)]
    assert failed[0].hook == "after_unload" and "RuntimeError: no a" in failed[0].error


def test_hook_config_mistakes_are_one_line() -> None:
    with pytest.raises(ConfigError, match="before_lod"):
        ManagerConfig.from_dict({"hooks": {"before_lod": "true"}})
    with pytest.raises(ConfigError, match="hook_timeout"):
        ManagerConfig.from_dict({"hook_timeout": 0})
    with pytest.raises(ConfigError, match="did you mean 'qwen'"):
        ManagerConfig.from_dict({"models": {"qwen": {}}, "on_startup": ["qwne"]})
    with pytest.raises(ConfigError, match="did you mean 'qwen'"):
        ManagerConfig.from_dict({"models": {"qwen": {}}, "baseline": "qwne"})


# -- on_startup -------------------------------------------------------------------------------


async def test_on_startup_preloads_and_a_failing_preload_is_not_fatal(
    sim: SimulatedProvider, caplog: pytest.LogCaptureFixture
) -> None:
    models = {"a": {"memory": "1GB"}, "b": {"memory": "1GB"}, "c": {"memory": "1GB"}}
    sim.fail_next("b")
    async with make_manager(sim, models, on_startup=["a", "b"]) as mm:
        await until(lambda: mm.is_loaded("a") and "b" in caplog.text)
        assert not mm.is_loaded("b") and not mm.is_loaded("c")
    assert "on_startup: could not preload b" in caplog.text


# -- the baseline model -----------------------------------------------------------------------

BASELINE = {
    "small": {"memory": "4GB"},
    "big": {"memory": "14GB"},
    "other": {"memory": "14GB", "options": {"load_time": 0.2}},
    "tiny": {"memory": "1GB"},
}


async def test_baseline_comes_back_once_the_big_model_is_unloaded(sim: SimulatedProvider) -> None:
    async with make_manager(sim, BASELINE, baseline="small") as mm:
        seen = record(mm)
        await until(lambda: mm.is_loaded("small"))  # at start, as memory is free
        await mm.load("big")  # evicts it
        assert not mm.is_loaded("small")
        await mm.unload("big")
        await until(lambda: mm.is_loaded("small"))
    loads = [e.model for e in seen if isinstance(e, ev.Loaded)]
    assert loads == ["small", "big", "small"]  # at start, evicted, back


async def test_baseline_gives_way_to_a_waiting_caller(sim: SimulatedProvider) -> None:
    # 20 GB: big evicts small; other must wait for big's memory; small fits beside other
    models = {**BASELINE, "big": {"memory": "17GB"}}
    async with make_manager(sim, models, baseline="small", budgets={"cuda:0": "20GB"}) as mm:
        await until(lambda: mm.is_loaded("small"))
        seen = record(mm)
        async with anyio.create_task_group() as tg, mm.use("big"):
            tg.start_soon(mm.load, "other")
            await until(lambda: any(isinstance(e, ev.Waiting) for e in seen))
            # big is released: other's admission evicts it; small would fit beside other
            # while other loads, but it waits until nothing else does
        await until(lambda: mm.is_loaded("small"))
        assert mm.is_loaded("other") and not mm.is_loaded("big")
    steps = [(e.kind, e.model) for e in seen if isinstance(e, ev.Loading | ev.Loaded | ev.Evicted)]
    assert steps.index(("Loading", "small")) > steps.index(("Loaded", "other")), steps
    assert [m for k, m in steps if k == "Evicted"] == ["small", "big"]
    assert [m for k, m in steps if k == "Loading"] == ["big", "other", "small"]


async def test_baseline_stays_out_while_it_would_evict(sim: SimulatedProvider) -> None:
    async with make_manager(sim, BASELINE, baseline="small") as mm:
        await until(lambda: mm.is_loaded("small"))
        seen = record(mm)
        await mm.load("big")
        await mm.load("tiny")
        await mm.unload("tiny")  # memory comes free, but not enough without evicting big
        await until(lambda: any(isinstance(e, ev.BaselineWaiting) and "evict big" in e.reason for e in seen))
        assert mm.is_loaded("big") and not mm.is_loaded("small")
        assert [e.model for e in seen if isinstance(e, ev.Evicted)] == ["small"]


async def test_a_background_load_never_evicts_nor_waits(sim: SimulatedProvider) -> None:
    async with make_manager(sim, BASELINE) as mm:
        await mm.load("big")
        with pytest.raises(LoadDeferred, match="would evict big"):
            await mm.load("small", background=True)
        assert mm.is_loaded("big") and not mm.is_loaded("small")
        await mm.unload("big")
        await mm.load("small", background=True)
        assert mm.is_loaded("small")
