"""Issue 22: leaving ``async with ModelManager(...)`` while many loads are in flight, across
three kinds of runtime (the simulated one, the Ollama emulator, and real server processes
through the process provider): nothing raised, every caller answered, nothing left."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

from modelmora import ModelManager, ModelMoraError
from modelmora.memory import StaticProbe
from modelmora.providers.simulated import SimulatedProvider
from modelmora.testing.ollama import OllamaEmulator

pytestmark = pytest.mark.anyio

TINY_SERVER = Path(__file__).with_name("tiny_server.py")

SIMULATED = 12  # models, 2 callers each, 1 GB on a 6 GB budget: half of them wait for memory
OLLAMA = 4  # models, 4 callers each
PROCESSES = 5  # models, 2 callers each
CALLERS = 2 * SIMULATED + 4 * OLLAMA + 2 * PROCESSES  # 50


def tiny_servers() -> list[psutil.Process]:
    """Live processes running ``tiny_server.py`` (this test's model servers)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if str(TINY_SERVER) in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


@contextlib.contextmanager
def no_server_left_behind() -> Iterator[None]:
    """Whatever the test finds, no tiny server outlives it."""
    try:
        yield
    finally:
        for p in tiny_servers():
            with contextlib.suppress(psutil.Error):
                p.kill()
                p.wait(5)


def config(emu: OllamaEmulator, state_dir: Path) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for i in range(SIMULATED):
        models[f"sim-{i}"] = {
            "provider": "simulated", "device": "cuda:1", "memory": "1GB", "options": {"load_time": 0.3 + 0.05 * i},
        }  # fmt: skip
    for i in range(OLLAMA):
        models[f"llm-{i}"] = {"provider": "ollama", "target": f"llm{i}:1b", "memory": "1GB"}
    for i in range(PROCESSES):
        models[f"srv-{i}"] = {
            "provider": "process", "target": f"tiny-{i}", "device": "cpu", "memory": "50MB",
            "options": {"command": [sys.executable, str(TINY_SERVER), "${PORT}"], "health": "/health",
                        "ready_timeout": 30},
        }  # fmt: skip
    return {
        "budgets": {"cuda:0": "24GB", "cuda:1": "6GB", "cpu": "4GB"},
        "providers": {
            "ollama": {"base_url": emu.url},
            "process": {"state_dir": str(state_dir), "poll_interval": 0.02, "stop_grace": 2},
        },
        "reaper_interval": 3600,
        "reconcile_interval": 3600,
        "models": models,
    }


async def test_leaving_the_manager_with_50_loads_in_flight(
    make_ollama: Callable[..., OllamaEmulator], tmp_path: Path
) -> None:
    """50 callers load models of three runtimes; the manager (``unload_on_exit``) is left
    once the first few are answered, with the rest in flight (loading, or waiting for
    memory).  ``__aexit__`` must raise nothing, every caller must be answered (a model or
    a ModelMoraError such as ManagerClosed), and no runtime may hold a model afterwards: no
    simulated model resident, nothing in Ollama's ``/api/ps``, no server process alive."""
    emu = make_ollama(models={f"llm{i}:1b": "1GB" for i in range(OLLAMA)}, max_loaded=8, load_delay=0.5)
    sim = SimulatedProvider()
    mm = ModelManager(
        config(emu, tmp_path / "process"),
        providers={"simulated": sim},
        probe=StaticProbe({}),
        unload_on_exit=True,
    )
    names = (
        [f"sim-{i}" for i in range(SIMULATED)] * 2
        + [f"llm-{i}" for i in range(OLLAMA)] * 4
        + [f"srv-{i}" for i in range(PROCESSES)] * 2
    )
    assert len(names) == CALLERS
    answers: dict[int, Any] = {}
    some_answered, all_answered = anyio.Event(), anyio.Event()
    exit_error: BaseException | None = None

    async def caller(i: int, name: str) -> None:
        try:
            await mm.load(name)
            answers[i] = "loaded"
        except ModelMoraError as exc:
            answers[i] = exc
        if len(answers) >= 5:
            some_answered.set()
        if len(answers) == CALLERS:
            all_answered.set()

    entered, leave, left = anyio.Event(), anyio.Event(), anyio.Event()

    async def lifespan() -> None:  # enters and leaves the manager in one task
        nonlocal exit_error
        try:
            async with mm:
                entered.set()
                await leave.wait()
        except Exception as exc:  # asserted below
            exit_error = exc
        finally:
            left.set()

    with no_server_left_behind():
        async with anyio.create_task_group() as tg:
            tg.start_soon(lifespan)
            await entered.wait()
            for i, name in enumerate(names):
                tg.start_soon(caller, i, name)
            with anyio.fail_after(60):  # a hang detector
                await some_answered.wait()
            in_flight = CALLERS - len(answers)
            leave.set()
            with anyio.move_on_after(120):  # a hang detector
                await left.wait()
            exited = left.is_set()
            with anyio.move_on_after(10):  # a hang detector: the callers, once the manager is gone
                await all_answered.wait()
            tg.cancel_scope.cancel()
        resident = sorted(sim.resident)
        async with httpx.AsyncClient(timeout=10) as http:
            ps = [m["name"] for m in (await http.get(f"{emu.url}/api/ps")).json()["models"]]
        servers = [" ".join(p.cmdline()[-2:]) for p in tiny_servers()]
    unanswered = sorted({names[i] for i in range(CALLERS) if i not in answers})
    problems = [
        *([] if exited else ["__aexit__ did not return within 120 s"]),
        *([] if exit_error is None else [f"__aexit__ raised {exit_error!r}"]),
        *([f"{len(unanswered)} callers never answered, for {unanswered}"] if unanswered else []),
        *([f"the simulated runtime still holds {resident}"] if resident else []),
        *([f"Ollama still holds {ps}"] if ps else []),
        *([f"{len(servers)} server processes are still running: {servers}"] if servers else []),
    ]
    assert in_flight > 0, "every load was over before the manager was left: nothing was in flight"
    assert not problems, "; ".join(problems)
