"""A manager process killed with SIGKILL while models are loaded through Ollama (emulator),
a process-provider server and a Docker container: a new manager adopts every one of them
from the runtimes and unloads them, and nothing is leaked."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from modelmora import ModelManager
from modelmora.memory import StaticProbe
from modelmora.net import free_port
from modelmora.providers.process import ProcessProvider, ProcessSettings
from modelmora.testing.docker import host_mounts
from modelmora.testing.ollama import OllamaEmulator

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

CHILD = textwrap.dedent(
    """
    import json, sys, time, anyio
    from modelmora import ModelManager
    from modelmora.memory import StaticProbe

    async def main():
        mm = ModelManager(json.loads(sys.argv[1]), probe=StaticProbe({}))
        await mm.__aenter__()  # never exited: this process dies with SIGKILL
        for name in ("chat", "web", "vllm"):
            await mm.load(name, keep_alive=3600)
        print("READY", flush=True)
        await anyio.sleep(3600)

    anyio.run(main)
    """
)


def config(emu: OllamaEmulator, state: Path, docker_url: str, image: str) -> dict[str, Any]:
    server = [sys.executable, "-m", "http.server", "${PORT}", "--bind", "127.0.0.1"]
    return {
        "budgets": {"cuda:0": "40GB", "cpu": "8GB"},
        "reconcile_interval": 3600,
        "providers": {
            "ollama": {"base_url": emu.url},
            "process": {"state_dir": str(state)},
            "vllm": {"docker_url": docker_url, "gpus": None, "hf_cache": None, "stop_grace": "5s", "poll_interval": 0.1},
        },
        "models": {
            "chat": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"},
            "web": {"provider": "process", "target": "files", "device": "cpu", "memory": "50MB",
                    "options": {"command": server, "health": "/"}},
            "vllm": {"provider": "vllm", "target": "Qwen/Qwen2.5-7B-Instruct", "memory": "8GB",
                     "options": {"image": image, "port": free_port(), "volumes": host_mounts(),
                                 "entrypoint": [sys.executable, "-m", "modelmora.testing.vllm"]}},
        },
    }  # fmt: skip


def http_servers() -> list[psutil.Process]:
    """The process provider's servers: ``python -m http.server`` processes still running."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if (p.info["cmdline"] or [])[1:3] == ["-m", "http.server"] and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def run_and_kill(cfg: dict[str, Any], emu: OllamaEmulator) -> None:
    """A manager in its own process loads all three models, then dies by SIGKILL."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "READY", line
        assert len(http_servers()) == 1 and emu.loaded() == ["qwen2.5:14b"]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def start_server() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


async def test_a_killed_manager_leaves_nothing_a_new_one_cannot_take_back(
    make_ollama: Callable[..., OllamaEmulator], docker_url: str, image: str, tmp_path: Path
) -> None:
    docker = pytest.importorskip("docker")
    emu = make_ollama()
    cfg = config(emu, tmp_path / "state", docker_url, image)
    client = docker.DockerClient(base_url=docker_url)
    try:  # the clean-up below also when the killed manager never got to READY
        await anyio.to_thread.run_sync(run_and_kill, cfg, emu)
        assert [c.name for c in client.containers.list(filters={"label": "modelmora.provider=vllm"})] == [
            "modelmora-vllm-vllm"
        ]
        async with ModelManager(cfg, probe=StaticProbe({})) as mm:
            status = {m.name: m for m in (await mm.status()).models}
            assert set(status) == {"chat", "web", "vllm"}
            assert status["web"].owned and status["vllm"].owned  # its own, by state file and label
            assert not status["chat"].owned  # Ollama cannot say who loaded it: adopted as not owned
            # what Ollama reports it holds: the weights and its KV cache
            assert 9 * 10**9 < status["chat"].memory["cuda:0"] < 10 * 10**9
            result = await mm.unload_all(force=True)
            assert sorted(result.unloaded) == ["chat", "vllm", "web"]
        assert emu.loaded() == []
        assert http_servers() == []
        assert client.containers.list(all=True, filters={"label": "modelmora.provider=vllm"}) == []
    finally:
        for c in client.containers.list(all=True, filters={"label": "modelmora.provider"}):
            c.remove(force=True)
        client.close()
        for p in http_servers():
            p.kill()


async def test_a_state_file_cut_short_by_a_kill_loses_nothing_it_had(tmp_path: Path) -> None:
    state = tmp_path / "state"
    settings = ProcessSettings(state_dir=str(state))
    provider = ProcessProvider("process", settings)
    server = await anyio.to_thread.run_sync(start_server)
    try:
        await anyio.sleep(0.2)
        record = {
            "files": {
                "pid": server.pid,
                "port": 1,
                "command": psutil.Process(server.pid).cmdline(),
                "log": str(state / "x.log"),
            }
        }
        state.mkdir(parents=True)
        (state / "process.json").write_text(json.dumps(record))
        # a writer killed mid-write leaves only a partial temporary file: the real one is whole
        (state / "process.tmp").write_text(json.dumps(record)[:25])
        observed = await provider.observe()
        assert [o.target for o in observed] == ["files"] and observed[0].details["pid"] == server.pid
        # a garbage state file (written by something else) is no crash: nothing is adopted
        (state / "process.json").write_text('{"files": {"pid": ')
        assert await ProcessProvider("process", settings).observe() == []
    finally:
        server.kill()
        server.wait()
        await provider.aclose()
