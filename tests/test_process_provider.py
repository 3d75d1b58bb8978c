"""The process provider with the real llama.cpp server (llama-cpp-python) as a subprocess."""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest
from conftest import servers_for

if importlib.util.find_spec("llama_cpp") is None:  # not imported here: the server runs it
    pytest.skip("bash .ci/setup.sh builds llama-cpp-python[server]", allow_module_level=True)

from modelmora import LoadFailed, ModelManager
from modelmora.chain import Chain, Step
from modelmora.memory import StaticProbe
from modelmora.testing.gguf import make_tiny_gguf

pytestmark = [pytest.mark.anyio, pytest.mark.llama]

SERVER = [
    sys.executable,
    "-m",
    "llama_cpp.server",
    "--model",
    "${MODEL}",
    "--host",
    "${HOST}",
    "--port",
    "${PORT}",
]


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def config(tmp_path: Path, target: str, **options: Any) -> dict[str, Any]:
    opts = {"command": SERVER, "health": "/v1/models", "ready_timeout": "60s", **options}
    return {
        "budgets": {"cpu": "4GB"},
        "providers": {"process": {"state_dir": str(tmp_path / "state"), "stop_grace": "5s"}},
        "models": {
            "tiny": {
                "provider": "process",
                "target": target,
                "device": "cpu",
                "memory": "200MB",
                "options": opts,
            }
        },
    }


async def test_start_serve_and_stop_a_real_llama_cpp_server(gguf_model: Path, tmp_path: Path) -> None:
    async with ModelManager(config(tmp_path, str(gguf_model)), probe=StaticProbe({})) as mm:
        async with mm.use("tiny") as handle:
            assert handle.api == "openai" and handle.endpoint is not None
            assert handle.memory["cpu"] > 10_000_000  # the server process's RSS, measured
            (server,) = servers_for(str(gguf_model))
            assert server.pid == handle.pid
            async with httpx.AsyncClient(timeout=60) as client:
                reply = await client.post(
                    f"{handle.endpoint}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}
                )
            assert reply.status_code == 200 and reply.json()["choices"][0]["text"] is not None
        # an LLM step through litellm, at the endpoint the lease hands out
        result = await Chain([Step("tiny", "Say: {input}", params={"max_tokens": 4})], manager=mm).run("hi")
        assert result.ok, result.reason and isinstance(result.output, str)
        assert await mm.unload("tiny") or not mm.is_loaded("tiny")
    assert servers_for(str(gguf_model)) == [], "an orphan llama.cpp server was left behind"


async def test_early_exit_fails_fast_with_its_output(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model.gguf")
    async with ModelManager(config(tmp_path, missing), probe=StaticProbe({})) as mm:
        with pytest.raises(LoadFailed, match="exited with code .* before it was ready; last output: .*"):
            await mm.load("tiny")
        assert mm.loaded() == []
    assert servers_for(missing) == []
    assert (tmp_path / "state" / "process.json").read_text().strip() == "{}"


async def test_a_server_that_never_gets_ready_is_killed(tmp_path: Path) -> None:
    sleeper = [
        sys.executable,
        "-c",
        "import time; print('warming up', flush=True); time.sleep(120)",
        "${PORT}",
    ]
    # 3 s: long enough for a loaded machine to start Python and print before the deadline
    cfg = config(tmp_path, "sleepy", command=sleeper, ready_timeout="3s")
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        with pytest.raises(LoadFailed, match=r"did not answer 200 within 3s; last output: warming up"):
            await mm.load("tiny")
    assert not [
        p for p in psutil.process_iter(["cmdline"]) if "time.sleep(120)" in " ".join(p.info["cmdline"] or [])
    ]


async def test_a_restarted_manager_adopts_the_running_server(gguf_model: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, str(gguf_model))
    async with ModelManager(cfg, probe=StaticProbe({})) as first:
        handle = await first.load("tiny", keep_alive=float("inf"))
        pid = handle.pid
    assert psutil.pid_exists(pid), "the manager must not stop servers when it exits"
    async with ModelManager(cfg, probe=StaticProbe({})) as second:
        (status,) = (await second.status()).models
        # adopted, but ready only once its health check answers: until then leases wait
        assert status.name == "tiny" and status.state in ("loading", "ready")
        async with second.use("tiny") as adopted:
            assert adopted.pid == pid
            async with httpx.AsyncClient(timeout=10) as client:
                assert (await client.get(f"{adopted.endpoint}/v1/models")).status_code == 200
        assert await second.unload("tiny")
    assert servers_for(str(gguf_model)) == []


def test_drop_connections_shuts_down_only_ours_to_that_port() -> None:
    from modelmora.providers.process import _drop_connections

    with socket.create_server(("127.0.0.1", 0)) as stopping, socket.create_server(("127.0.0.1", 0)) as other:
        port, other_port = stopping.getsockname()[1], other.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port)) as ours,
            socket.create_connection(("127.0.0.1", other_port)) as unrelated,
        ):
            accepted, _ = stopping.accept()
            with accepted:
                assert _drop_connections("127.0.0.1", port) == 1
                assert ours.recv(1) == b""  # our side is shut down while the server's is still open
                with pytest.raises(BrokenPipeError):
                    ours.send(b"x")
                unrelated.sendall(b"still open")
                assert accepted.recv(1) == b""  # the server sees our FIN at once


async def test_unload_shuts_our_idle_connections_before_it_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle keep-alive connection would hold llama-server's exit up (it waits for the
    peer's FIN), so the unload shuts down ours before the SIGTERM."""
    from modelmora.providers import process

    server = [sys.executable, "-m", "http.server", "${PORT}", "--bind", "${HOST}"]
    cfg = config(tmp_path, "static", command=server, health="/")
    ours: list[socket.socket] = []
    seen: list[str] = []
    real = process._signal_group

    def signal_group(pid: int, sig: signal.Signals) -> None:
        for sock in ours:
            try:
                sock.send(b"x")
                seen.append("open")
            except BrokenPipeError:
                seen.append("shut down")
        real(pid, sig)

    monkeypatch.setattr(process, "_signal_group", signal_group)
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        handle = await mm.load("tiny")
        assert handle.endpoint is not None
        ours.append(socket.create_connection(("127.0.0.1", int(handle.endpoint.rsplit(":", 1)[1]))))
        assert await mm.unload("tiny")
    ours[0].close()
    assert seen == ["shut down"]


async def test_readiness_is_checked_when_the_server_makes_progress_not_only_each_interval() -> None:
    from modelmora.providers.readiness import wait_until_ready

    state = {"ready": False, "progress": False, "checks": 0}

    async def ready() -> bool:
        state["checks"] += 1
        return bool(state["ready"])

    async def died() -> str | None:
        return None

    async def output() -> str:
        return ""

    def progress() -> bool:
        seen, state["progress"] = state["progress"], False
        return bool(seen)

    async def server() -> None:
        await anyio.sleep(0.05)
        state["ready"] = state["progress"] = True  # e.g. llama-server logs "model loaded"

    with anyio.fail_after(30):  # an interval of an hour: only the progress signal can end the wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            await wait_until_ready(
                ready, died, output, model="m", provider="p", not_ready="no", timeout=7200,
                interval=3600, progress=progress,
            )  # fmt: skip
    assert state["checks"] == 2  # at once, then when the server made progress


async def test_a_server_is_ready_when_its_log_says_so_without_waiting_a_poll_interval(tmp_path: Path) -> None:
    server = [sys.executable, "-u", "-m", "http.server", "${PORT}", "--bind", "${HOST}"]
    cfg = config(tmp_path, "static", command=server, health="/")
    cfg["providers"]["process"]["poll_interval"] = "1h"
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        with anyio.fail_after(60):  # "Serving HTTP on ..." in its log triggers the health check
            handle = await mm.load("tiny")
        assert handle.endpoint is not None
        assert await mm.unload("tiny")


@pytest.mark.parametrize("from_proc", [True, False], ids=["proc", "psutil"])
def test_tree_rss_counts_every_descendant(
    from_proc: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelmora.providers import process

    if from_proc and not process._PROC_CHILDREN:
        pytest.skip("no /proc/<pid>/task/<tid>/children here")
    monkeypatch.setattr(process, "_PROC_CHILDREN", from_proc)
    child = tmp_path / "child.py"
    child.write_text(
        "import subprocess, time\nsubprocess.Popen(['sleep', '30'])\nprint('up', flush=True)\ntime.sleep(30)\n"
    )
    # sh starts its sleep before the Python child, so by the child's "up" all four are there
    parent = subprocess.Popen(
        ["sh", "-c", f"sleep 30 & {sys.executable} {child} & wait"], stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline() == b"up\n"
        root = psutil.Process(parent.pid)
        tree = [root, *root.children(recursive=True)]
        assert len(tree) == 4  # sh, its sleep, python, its sleep
        assert sorted(process._descendants(parent.pid)) == sorted(p.pid for p in tree[1:])
        assert process._tree_rss(parent.pid) >= sum(p.memory_info().rss for p in tree) * 0.9
        assert process._tree_rss(2**22 + 7) == 0
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_log_says_fires_once_per_new_marker_even_split_across_reads(tmp_path: Path) -> None:
    from modelmora.providers.process import _LogSays

    log = tmp_path / "server.log"
    says = _LogSays(log, (b"model loaded",))
    assert not says()  # no log yet
    log.write_bytes(b"loading the model\n")
    assert not says()
    with log.open("ab") as f:
        f.write(b"srv  llama_server: model lo")
    assert not says()
    with log.open("ab") as f:
        f.write(b"aded\n")
    assert says()  # the marker straddled two reads
    assert not says()  # nothing new since


async def test_observe_rewrites_the_state_file_only_when_it_changes(tmp_path: Path) -> None:
    import json

    from modelmora.providers.process import ProcessProvider, ProcessSettings

    provider = ProcessProvider("process", ProcessSettings(state_dir=str(tmp_path)))
    dead = {"pid": 2**22 + 7, "port": 1, "command": ["gone"], "log": str(tmp_path / "gone.log")}
    provider.state_file.write_text(json.dumps({"/models/gone": dead}))
    try:
        assert await provider.observe() == []
        assert json.loads(provider.state_file.read_text()) == {}  # the dead record is dropped
        inode = provider.state_file.stat().st_ino
        assert await provider.observe() == []
        assert provider.state_file.stat().st_ino == inode  # nothing changed: not rewritten
    finally:
        await provider.aclose()


# A server that logs llama-server's ready line but whose /health never answers 200.
NEVER_HEALTHY = """
import sys, http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503); self.end_headers()
    def log_message(self, *a):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("srv  llama_server: model loaded", flush=True)
server.serve_forever()
"""


@pytest.mark.parametrize("log_means_ready", [True, False])
async def test_a_server_that_logs_its_ready_line_is_ready_without_a_health_request(
    tmp_path: Path, log_means_ready: bool
) -> None:
    """llama-server is ready once it logs ``model loaded`` (its /health answers 200 from the
    same moment), so the llamacpp provider takes the line as the signal instead of a health
    request; a provider that does not know its server's lines keeps asking /health."""
    from modelmora.providers.llamacpp import READY_LINES
    from modelmora.providers.process import ProcessProvider, ProcessSettings, _LogSays, _Running
    from modelmora.spec import ModelSpec

    class LogReady(ProcessProvider):
        def _progress(self, running: _Running) -> Any:
            return _LogSays(running.log, READY_LINES)

    LogReady.log_means_ready = log_means_ready
    script = tmp_path / "server.py"
    script.write_text(NEVER_HEALTHY)
    provider = LogReady("process", ProcessSettings(state_dir=str(tmp_path), ready_timeout=3))
    spec = ModelSpec(
        name="m", provider="process", target="m", device="cpu",
        options={"command": [sys.executable, str(script), "${PORT}"]},
    )  # fmt: skip
    try:
        if log_means_ready:
            handle = await provider.load(spec)
            await provider.unload(handle)
        else:
            with pytest.raises(LoadFailed, match="did not answer 200"):
                await provider.load(spec)
        assert provider.running == {}
    finally:
        await provider.aclose()


async def test_a_server_that_cannot_start_leaves_our_connections_to_its_port_alone(tmp_path: Path) -> None:
    """The port a model's server was given belongs to another runtime (a fixed port, a
    race): the server exits at once, and the clean-up must not shut down this process's
    connections to that other runtime (say, the proxy's in-flight requests to it)."""
    other = socket.create_server(("127.0.0.1", 0))
    port = other.getsockname()[1]
    ours = socket.create_connection(("127.0.0.1", port))
    peer, _ = other.accept()
    cfg = {
        "budgets": {"cpu": "4GB"},
        "providers": {"process": {"state_dir": str(tmp_path / "state"), "stop_grace": "5s"}},
        "models": {"x": {"provider": "process", "target": "x", "device": "cpu", "memory": "10MB",
                         "options": {"command": [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                     "port": port, "health": "/", "ready_timeout": "20s"}}},
    }  # fmt: skip
    try:
        async with ModelManager(cfg, probe=StaticProbe({})) as mm:
            with pytest.raises(LoadFailed, match="exited"):
                await mm.load("x")
        ours.sendall(b"still ours")
        peer.settimeout(5)
        assert peer.recv(100) == b"still ours"
    finally:
        for s in (ours, peer, other):
            s.close()


def test_llama_servers_ready_lines_are_not_mistaken_for_others(tmp_path: Path) -> None:
    from modelmora.providers.llamacpp import READY_LINES
    from modelmora.providers.process import _LogSays

    log = tmp_path / "server.log"
    says = _LogSays(log, READY_LINES)
    log.write_bytes(
        b"0.00.011 I srv    load_model: loading model '/models/x: model loaded\\n.gguf'\n"
        b"0.00.012 I clip: no CLIP model loaded\n"
    )
    assert not says() and not says.seen
    with log.open("ab") as f:
        f.write(b"0.00.038 I srv  llama_server: model loaded\n")
    assert says() and says.seen


async def test_a_server_on_a_gpu_is_measured_by_what_nvml_says_its_processes_hold(tmp_path: Path) -> None:
    """On a GPU the memory of a server is its process tree's share in NVML's per-process
    accounting (the registry's number is only the estimate before the load).  NVML is the
    one stand-in here: a probe that reports the running server's PID holding 3 GB."""
    from modelmora.memory import DeviceMemory, MemoryProbe
    from modelmora.providers.process import ProcessProvider, ProcessSettings
    from modelmora.spec import ModelSpec

    provider = ProcessProvider("process", ProcessSettings(state_dir=str(tmp_path)))

    class Nvml(MemoryProbe):
        def read(self) -> list[DeviceMemory]:
            held = {running.pid: 3 * 10**9 for running in provider.running.values()}
            other = {1: 5 * 10**9}  # another process on the GPU: not the server's
            return [DeviceMemory("cuda:0", 80 * 10**9, 8 * 10**9, 72 * 10**9, "nvml", "H100", held | other)]

    provider.gpu_probe = Nvml()
    spec = ModelSpec(
        name="m", provider="process", target="m", device="cuda:0", memory={"cuda:0": 10**9},
        options={"command": [sys.executable, "-m", "http.server", "${PORT}", "--bind", "127.0.0.1"], "health": "/"},
    )  # fmt: skip
    try:
        handle = await provider.load(spec)
        assert handle.memory == {"cuda:0": 3 * 10**9}
        assert await provider.unload(handle) == {"cuda:0": 3 * 10**9}
        assert provider.running == {}
    finally:
        await provider.aclose()
