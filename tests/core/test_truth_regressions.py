"""Issue 15, runtime truth (failures 8-11) and stale observations: the table follows what
the runtimes really hold, neither inventing models nor losing them, and never acts on an
answer that is out of date."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from modelmora import ModelManager
from modelmora import events as ev
from modelmora.memory import StaticProbe
from modelmora.net import free_port
from modelmora.providers.base import Capabilities
from modelmora.providers.torch import TorchProvider
from modelmora.testing.faulty import FaultyProvider
from modelmora.testing.ollama import OllamaEmulator

from .support import Events, faulty_manager, model, settle

pytestmark = pytest.mark.anyio

TINY_SERVER = Path(__file__).with_name("tiny_server.py")


# -- 8. Ollama's :latest -----------------------------------------------------------------------


async def test_08_a_model_ollama_lists_as_latest_is_the_same_model(
    make_ollama: Callable[..., OllamaEmulator],
) -> None:
    # Ollama stores `nomic-embed-text` as `nomic-embed-text:latest` and lists it so in /api/ps
    emu = make_ollama(models={"nomic-embed-text:latest": {"size": "300MB", "embedding": True}})
    config = {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}},
        "reaper_interval": 3600,
        "reconcile_interval": 3600,
        "models": {
            "embed": {
                "provider": "ollama", "target": "nomic-embed-text", "memory": "300MB",
                "options": {"kind": "embedding"},
            }
        },
    }  # fmt: skip
    async with ModelManager(config, probe=StaticProbe({})) as mm:
        events = Events(mm)
        async with mm.use("embed") as handle:
            await mm.reconcile()
            assert not events.of(ev.Vanished), "reconcile dropped the leased model Ollama still lists"
            assert not handle.closed
            assert mm.loaded() == ["embed"], "an unowned copy of the same model was adopted"
            # counted once, for what Ollama reports it holds (weights + its KV cache)
            [seen] = await mm.provider("ollama").observe()
            assert mm.usage()["cuda:0"] == seen.memory["cuda:0"] >= 300 * 10**6


# -- 9. the torch provider reports a parked model as active ------------------------------------


async def test_09_reconcile_keeps_a_parked_torch_model_parked() -> None:
    torch = TorchProvider()
    spec = {
        "provider": "torch", "target": "collections:OrderedDict", "device": "cpu", "memory": "1MB",
        "warm_tier": True, "options": {"kind": "factory"},
    }  # fmt: skip
    config = {"budgets": {"cpu": "1GB"}, "reaper_interval": 3600, "reconcile_interval": 3600}
    async with ModelManager(
        {**config, "models": {"w": spec}}, providers={"torch": torch}, probe=StaticProbe({})
    ) as mm:
        await mm.load("w")
        assert await mm.park("w")
        await mm.reconcile()
        assert mm.is_parked("w"), "reconcile believed the torch provider's 'active' for a parked model"


# -- 10. adopting a server that is still starting ----------------------------------------------


@contextlib.contextmanager
def tiny_server(command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def process_config(state_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "budgets": {"cpu": "4GB"},
        "providers": {"process": {"state_dir": str(state_dir), "poll_interval": 0.02, "stop_grace": 2}},
        "reaper_interval": 3600,
        "reconcile_interval": 3600,
        "models": {
            "tiny": {
                "provider": "process", "target": "tiny", "device": "cpu", "memory": "50MB",
                "options": {"command": [sys.executable, str(TINY_SERVER), "${PORT}"], "health": "/health",
                            "ready_timeout": 30},
            }
        },
        **extra,
    }  # fmt: skip


async def test_10_an_adopted_server_that_is_still_starting_is_not_handed_out(tmp_path: Path) -> None:
    port, gate = free_port(), tmp_path / "ready"
    command = [sys.executable, str(TINY_SERVER), str(port), str(gate)]  # alive, not listening yet
    state_dir = tmp_path / "process"
    state_dir.mkdir()
    with tiny_server(command) as server, anyio.fail_after(60):
        # what a previous manager left in the process provider's state file
        record = {"pid": server.pid, "port": port, "command": command, "log": str(tmp_path / "tiny.log")}
        (state_dir / "process.json").write_text(json.dumps({"tiny": record}))
        async with ModelManager(process_config(state_dir), probe=StaticProbe({})) as mm:
            got_handle = anyio.Event()
            answers: list[Any] = []

            async def user() -> None:
                async with mm.use("tiny", timeout=30) as handle, httpx.AsyncClient() as http:
                    got_handle.set()
                    try:
                        answers.append((await http.get(f"{handle.endpoint}/health")).status_code)
                    except httpx.ConnectError as exc:
                        answers.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(user)
                await settle()
                if got_handle.is_set():  # handed out before the server was healthy:
                    while not answers:  # let its first request meet the closed port
                        await anyio.sleep(0.01)
                gate.touch()  # the server finishes starting
            await mm.unload("tiny", force=True)
    assert answers == [200], f"the first lease got a server that was not ready: {answers}"


# -- 11. a crashed runtime is believed ready until the next reconcile --------------------------


async def test_11_a_server_that_dies_leaves_the_table_at_once_and_the_next_use_reloads(
    tmp_path: Path,
) -> None:
    async with ModelManager(process_config(tmp_path / "process"), probe=StaticProbe({})) as mm:
        events = Events(mm)
        async with mm.use("tiny") as handle, httpx.AsyncClient() as http:
            first = (await http.get(f"{handle.endpoint}/health")).json()["pid"]
        os.kill(first, signal.SIGKILL)
        with anyio.move_on_after(10):  # generous: the provider owns the child and sees it exit
            while not events.of(ev.Vanished, "tiny"):
                await anyio.sleep(0.02)
        noticed = bool(events.of(ev.Vanished, "tiny"))
        state = {m.name: m.state for m in (await mm.status()).models}
        async with mm.use("tiny") as handle, httpx.AsyncClient() as http:
            try:
                reply: Any = (await http.get(f"{handle.endpoint}/health")).json()
            except httpx.ConnectError as exc:
                reply = exc
        await mm.unload_all(force=True)
    assert noticed, (
        f"10 s after its server was killed, the manager still has {state} (no Vanished event); "
        f"the next lease got: {reply!r}"
    )
    assert isinstance(reply, dict) and reply["pid"] != first, reply


# -- reconcile never applies a stale observation -----------------------------------------------


async def test_reconcile_does_not_apply_an_observation_older_than_the_entry_it_concerns() -> None:
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"a": model(8, warm_tier=True)}) as mm:
        await mm.load("a")
        faulty.hold("observe", times=1)  # the answer is computed now (a active) ...
        async with anyio.create_task_group() as tg:
            tg.start_soon(mm.reconcile)
            await faulty.wait_pending("observe")
            assert await mm.park("a")  # ... a is parked meanwhile ...
            faulty.release("observe")  # ... and the old answer arrives
        assert faulty.instances["a"].parked_memory is not None
        assert mm.is_parked("a"), "a stale 'active' observation flipped the parked model back to ready"


# -- a caller that waited for an adoption that failed -----------------------------------------


async def test_a_caller_waiting_on_a_failed_adoption_gets_a_fresh_load_not_its_error() -> None:
    """The model was found resident at start-up and its adoption is under way when a caller
    asks for it; the adoption fails (the server found there never got ready).  That was
    not the caller's load: the caller's request loads the model afresh."""
    faulty = FaultyProvider()
    faulty.capabilities = Capabilities(warm_tier=True, refresh=True, slow_adopt=True)  # start-up won't wait
    faulty.add_foreign("a", {"cuda:0": 4 * 10**9}, owned=True)
    faulty.hold("adopt", "a", times=1)
    with anyio.fail_after(30):
        await _caller_after_failed_adoption(faulty)


async def _caller_after_failed_adoption(faulty: FaultyProvider) -> None:
    async with faulty_manager(faulty, {"a": model(4)}) as mm:
        await faulty.wait_pending("adopt", "a")
        async with anyio.create_task_group() as tg:
            got: list[Any] = []

            async def caller() -> None:
                async with mm.use("a") as handle:
                    got.append(handle)

            tg.start_soon(caller)
            await settle()
            faulty.release("adopt", "a", error=RuntimeError("the adopted server never got ready"))
        loads = [c for c in faulty.calls if c.op == "load" and c.target == "a"]
        assert len(got) == 1 and len(loads) == 1 and loads[0].outcome == "ok"
