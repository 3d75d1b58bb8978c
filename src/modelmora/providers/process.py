"""Any OpenAI-compatible server started as a subprocess: ``llama-server``,
``python -m llama_cpp.server``, ``vllm serve``, SGLang — one process per model.

    models:
      qwen-small:
        provider: process
        target: /models/qwen2.5-0.5b-q4.gguf
        device: cpu
        memory: 600MB
        options:
          command: ["python", "-m", "llama_cpp.server", "--model", "${MODEL}", "--port", "${PORT}"]
          health: /v1/models          # polled until 200
          ready_timeout: 2m

* **Load** substitutes ``${PORT}`` (a free loopback port unless ``options.port``),
  ``${MODEL}`` (the target), ``${HOST}``, ``${DEVICE}`` (``cuda:1``) and ``${GPU}`` (``1``), starts the command in its own process group
  with its output going to a log file, and polls the health URL until it answers 200.  A
  process that exits first fails the load at once, with the last lines of its log.
* **Unload** is SIGTERM to the process group (or ``options.stop_command`` with ``${PID}``),
  then SIGKILL after ``stop_grace``; the memory freed is the process tree's RSS.
* **Observe** lists the processes it started, and, after a restart, those recorded in
  its state file whose PID is still alive with the same command line, so a new manager
  adopts them instead of losing track of their memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import psutil
from pydantic import Field

from ..errors import ConfigError, LoadFailed, UnloadFailed
from ..memory import MemoryProbe, gpu_bytes_of
from ..net import expand, free_port
from ..spec import Duration, Interval, ModelSpec, parse_duration
from .base import Capabilities, Handle, Observed, Provider, ProviderSettings, gpu_ids
from .readiness import wait_until_ready


def _home() -> Path:
    return Path(os.environ.get("MODELMORA_HOME", Path.home() / ".cache" / "modelmora"))


class ProcessSettings(ProviderSettings):
    host: str = Field("127.0.0.1", description="Address the servers bind and are polled on.")
    state_dir: str | None = Field(None, description="PID records and logs (default $MODELMORA_HOME/process).")
    ready_timeout: Duration = Field(120.0, description="Default wait for the health URL to answer 200.")
    stop_grace: Duration = Field(10.0, description="SIGTERM to SIGKILL.")
    poll_interval: Interval = Field(0.1, description="Health polling period while starting.")


@dataclass
class _Running:
    pid: int
    port: int
    command: list[str]
    log: Path
    process: anyio.abc.Process | None = None  # None for an adopted process (not our child)
    ready: bool = False  # it answered as ready on ``port``, so the port is its own


class ProcessProvider(Provider):
    Settings = ProcessSettings
    settings: ProcessSettings
    capabilities = Capabilities(watch=True, slow_adopt=True)
    gpu_probe: MemoryProbe | None = None  # NVML per process, shared (tests put another here)
    # a server whose log shows one of its ready lines (see _progress) is ready without a
    # health request: only for servers known to log them once they serve (llama-server)
    log_means_ready = False

    def __init__(self, name: str = "process", settings: ProcessSettings | None = None):
        super().__init__(name, settings)
        self.state_dir = Path(self.settings.state_dir) if self.settings.state_dir else _home() / "process"
        self.running: dict[str, _Running] = {}
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(5.0))

    # -- the state file ------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"{self.name}.json"

    def _read_state(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _records(self) -> dict[str, dict[str, Any]]:
        return {
            target: {"pid": r.pid, "port": r.port, "command": r.command, "log": str(r.log)}
            for target, r in self.running.items()
        }

    def _write_state(self) -> None:
        records = self._records()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(self.state_file)

    # -- commands ------------------------------------------------------------------------

    def _command(self, spec: ModelSpec, port: int) -> list[str]:
        raw = spec.options.get("command")
        if not raw:
            raise ConfigError(
                f"{spec.name}: options.command is required for the process provider", model=spec.name
            )
        parts = shlex.split(raw) if isinstance(raw, str) else list(raw)
        values = {"PORT": str(port), "MODEL": spec.target, "HOST": self.settings.host, "DEVICE": spec.device}
        values["GPU"] = gpu_ids(spec)
        return expand(parts, values)

    def _env(self, spec: ModelSpec) -> dict[str, str]:
        """The server's environment: this process's, then ``options.env``; a model the
        planner placed (``device: auto``, ``devices``) sees only its GPU
        (``CUDA_VISIBLE_DEVICES``), unless ``options.env`` sets that itself."""
        env = dict(os.environ)
        own = {str(k): str(v) for k, v in (spec.options.get("env") or {}).items()}
        if spec.placed and spec.device.startswith("cuda:") and "CUDA_VISIBLE_DEVICES" not in own:
            env["CUDA_VISIBLE_DEVICES"] = gpu_ids(spec)
        env.update(own)
        return env

    def _url(self, port: int) -> str:
        return f"http://{self.settings.host}:{port}"

    # -- provider ------------------------------------------------------------------------

    async def load(self, spec: ModelSpec) -> Handle:
        if spec.target in self.running:
            raise LoadFailed(
                f"{spec.name}: a process for {spec.target!r} is already running", model=spec.name
            )
        port = int(spec.options.get("port") or free_port(self.settings.host))
        command = self._command(spec, port)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.state_dir / f"{spec.name.replace('/', '_')}-{port}.log"
        timeout = parse_duration(spec.options.get("ready_timeout", self.settings.ready_timeout))
        with log.open("wb") as sink:
            try:
                process = await anyio.open_process(
                    command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                    env=self._env(spec), cwd=spec.options.get("cwd"), start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise LoadFailed(
                    f"{spec.name}: cannot start {command[0]!r}: {exc}", model=spec.name
                ) from None
        running = _Running(process.pid, port, command, log, process)
        self.running[spec.target] = running
        self._write_state()
        try:
            await self._wait_ready(spec, running, timeout)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._stop(spec, running)
            raise
        return await self._handle(spec, running)

    async def _handle(self, spec: ModelSpec, running: _Running) -> Handle:
        """The handle for a ready server (started here or adopted), its memory measured."""
        return Handle(
            spec=spec, provider=self.name, endpoint=self._url(running.port), api="openai",
            memory=await self._measure(spec, running.pid), owned=True,
            pid=running.pid, runtime=running, served_name=self._served_name(spec),
        )  # fmt: skip

    def _served_name(self, spec: ModelSpec) -> str:
        return str(spec.options.get("served_name", spec.target))

    async def _wait_ready(self, spec: ModelSpec, running: _Running, timeout: float) -> None:
        health = self._url(running.port) + str(spec.options.get("health", "/health"))
        process = running.process

        progress = self._progress(running)

        async def ready() -> bool:
            if isinstance(progress, _LogSays) and progress.seen and self.log_means_ready:
                return True  # the server said so itself; no request to confirm it
            return (await self._client.get(health)).status_code == 200

        async def died() -> str | None:
            if process is None:  # adopted: not our child, so only its PID can be watched
                return None if _alive(running.pid) else f"the server (pid {running.pid}) exited"
            code = process.returncode
            return None if code is None else f"the server exited with code {code}"

        async def output() -> str:
            return _tail(running.log)

        await wait_until_ready(
            ready, died, output, model=spec.name, provider=self.name, not_ready=f"{health} did not answer 200",
            timeout=timeout, interval=self.settings.poll_interval, progress=progress,
        )  # fmt: skip
        running.ready = True

    def _progress(self, running: _Running) -> Callable[[], bool]:
        """When to ask the health URL before the next poll: the server logged something."""
        return _Growth(running.log)

    async def _measure(self, spec: ModelSpec, pid: int) -> dict[str, int]:
        return await measure_tree(spec, pid, self.gpu_probe)

    async def unload(self, handle: Handle) -> dict[str, int]:
        running = self.running.get(handle.target)
        if running is None:
            handle.close()
            return {}
        freed = await self._measure(handle.spec, running.pid)
        await self._stop(handle.spec, running)
        handle.close()
        return freed

    async def _stop(self, spec: ModelSpec, running: _Running) -> None:
        try:
            self._drop_idle_connections(running)  # see _drop_connections: a faster exit
            stop_command = spec.options.get("stop_command")
            if stop_command:
                parts = shlex.split(stop_command) if isinstance(stop_command, str) else list(stop_command)
                parts = expand(parts, {"PID": str(running.pid)})
                await anyio.run_process(parts, check=False)
            else:
                _signal_group(running.pid, signal.SIGTERM)
            if not await self._exited(running, self.settings.stop_grace):
                _signal_group(running.pid, signal.SIGKILL)
                if not await self._exited(running, 10.0):
                    raise UnloadFailed(
                        f"{spec.name}: process {running.pid} survived SIGKILL", model=spec.name
                    )
        finally:
            if not _alive(running.pid):
                self.running.pop(spec.target, None)
                self._write_state()

    def _drop_idle_connections(self, running: _Running) -> None:
        """Shut down our connections to ``running``'s port, only when the port is that
        server's: it answered as ready there and is still alive.  A server that never got
        ready (it could not bind a port another runtime holds) must not cost us our
        connections to that runtime.  Best effort: nothing here may fail the stop."""
        try:
            if running.ready and _alive(running.pid):
                _drop_connections(self.settings.host, running.port)
        except Exception:  # an optimisation: the stop itself goes on
            return

    async def _exited(self, running: _Running, timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            if running.process is not None:
                await running.process.wait()  # reaps our child, so no zombie is left
                return True
            # not our child (adopted after a restart): nothing to wait on but the PID itself
            while _alive(running.pid):  # noqa: ASYNC110
                await anyio.sleep(0.05)
            return True
        return False

    async def observe(self) -> list[Observed]:
        recorded = self._read_state()
        for target, record in recorded.items():
            if target in self.running:
                continue
            pid = int(record.get("pid", 0))
            if _same_process(pid, record.get("command") or []):
                self.running[target] = _Running(
                    pid, int(record["port"]), list(record["command"]), Path(record["log"])
                )
        out = []
        for target, running in list(self.running.items()):
            if not _alive(running.pid):
                self.running.pop(target)
                continue
            out.append(
                Observed(
                    target=target, memory={"cpu": _tree_rss(running.pid)}, owned=True,
                    details={"pid": running.pid, "port": running.port},
                )
            )  # fmt: skip
        if self._records() != recorded:  # observe runs on every admission: no needless write
            self._write_state()
        return out

    async def adopt(self, observed: Observed, spec: ModelSpec) -> Handle:
        """A server left running by an earlier manager: ready once its health check answers
        (it may still be starting), so no lease gets a connection error."""
        running = self.running[observed.target]
        timeout = parse_duration(spec.options.get("ready_timeout", self.settings.ready_timeout))
        await self._wait_ready(spec, running, timeout)
        return await self._handle(spec, running)

    async def watch(self, handle: Handle) -> str:
        """Returns when the server process exits: our child is waited on (and reaped); an
        adopted server, not our child, is watched by PID."""
        running = handle.runtime
        assert isinstance(running, _Running)
        if running.process is not None:
            code = await running.process.wait()
            reason = f"the server process (pid {running.pid}) exited with code {code}"
        else:
            while _alive(running.pid):  # noqa: ASYNC110
                await anyio.sleep(0.2)
            reason = f"the server process (pid {running.pid}) is gone"
        if self.running.get(handle.target) is running:
            del self.running[handle.target]
            self._write_state()
        return reason

    async def aclose(self) -> None:
        await self._client.aclose()


class _Growth:
    """Whether a server's log grew since the last look: a server logs as it gets ready
    (llama-server: "model loaded", "listening on"), so a new line is the moment to ask its
    health URL.  One ``stat`` a call."""

    every = 0.025  # seconds: at most one health request this often (progress bars log a lot)

    def __init__(self, log: Path):
        self.log = log
        self.size = -1
        self.last = -math.inf

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.every:
            return False
        try:
            size = self.log.stat().st_size
        except OSError:
            return False
        grew, self.size = size != self.size, size
        if grew:
            self.last = now
        return grew


class _LogSays:
    """Whether a server's log gained one of ``markers`` (its own "I am ready" lines) since
    the last look; reads only the new bytes."""

    def __init__(self, log: Path, markers: tuple[bytes, ...]):
        self.log = log
        self.markers = markers
        self.offset = 0
        self.carry = b""  # a marker may straddle two reads
        self.seen = False  # a marker has been logged (stays True)

    def __call__(self) -> bool:
        try:
            with self.log.open("rb") as f:
                f.seek(self.offset)
                new = f.read()
        except OSError:
            return False
        if not new:
            return False
        self.offset += len(new)
        text, keep = self.carry + new, max(map(len, self.markers)) - 1
        self.carry = text[-keep:] if keep else b""
        found = any(m in text for m in self.markers)
        self.seen = self.seen or found
        return found


async def measure_tree(spec: ModelSpec, pid: int, probe: MemoryProbe | None = None) -> dict[str, int]:
    """Bytes per device a model's server holds, ``pid`` and the processes below it: their
    RSS on the CPU (``/proc``, fast, on the event loop); on a GPU what NVML's per-process
    accounting says they hold there (:func:`~modelmora.memory.gpu_bytes_of`: driver calls,
    in a worker thread), else the registry's estimate (no NVML, or nothing held there yet).
    ``probe``: another source of NVML's readings (tests)."""
    if spec.device.startswith("cuda"):
        return await anyio.to_thread.run_sync(_tree_memory, spec, pid, probe)
    return _tree_memory(spec, pid, probe)


def _tree_memory(spec: ModelSpec, pid: int, probe: MemoryProbe | None) -> dict[str, int]:
    memory = dict(spec.memory)
    if spec.device == "cpu" or not memory:
        memory["cpu"] = _tree_rss(pid)
    elif spec.device.startswith("cuda"):
        measured = gpu_bytes_of([pid, *_descendants(pid)], probe)
        for device in spec.runs_on:  # each GPU of a model placed on several
            if measured.get(device):
                memory[device] = measured[device]
    return memory


def _tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(no output)"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _same_process(pid: int, command: list[str]) -> bool:
    """A recorded PID still alive and still running the recorded command (PIDs get reused)."""
    try:
        return pid > 0 and _alive(pid) and psutil.Process(pid).cmdline() == command
    except psutil.Error:
        return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(pid), sig)


def _drop_connections(host: str, port: int) -> int:
    """Shut down the TCP connections this process holds to the server at ``host:port``
    (about to stop); returns how many.  An idle keep-alive connection (pooled by an HTTP
    client here: ours, the proxy's) delays a stopping server: llama-server closes each
    connection gracefully, waiting up to 100 ms for the peer to answer its FIN, which an
    idle pooled connection never reads.  Shut down, our FIN goes out at once, and the pool
    discards the connection when it next looks at it.  Best effort, and cheap (well under
    a millisecond: it reads this process's file descriptors, not the system's sockets)."""
    peers = {host, "127.0.0.1", "::1"} if host in ("", "0.0.0.0", "::", "localhost") else {host}
    dropped = 0
    for fd in _socket_fds():
        try:
            duplicate = os.dup(fd)
        except OSError:
            continue
        try:
            sock = socket.socket(fileno=duplicate)
        except OSError:  # no longer a socket (the descriptor was reused)
            os.close(duplicate)
            continue
        with sock, contextlib.suppress(OSError):
            peer = sock.getpeername() if sock.type == socket.SOCK_STREAM else None
            if isinstance(peer, tuple) and peer[1] == port and peer[0] in peers:
                sock.shutdown(socket.SHUT_RDWR)  # the socket itself, not only this duplicate
                dropped += 1
    return dropped


def _socket_fds() -> list[int]:
    """This process's socket file descriptors (from ``/proc/self/fd``, else psutil)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        try:
            return [c.fd for c in psutil.Process().net_connections(kind="tcp") if c.fd >= 0]
        except psutil.Error:
            return []
    out = []
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                out.append(int(name))
    return out


def _tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and its descendants (0 when ``pid`` is gone)."""
    try:
        total = psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0
    for child in _descendants(pid):
        with contextlib.suppress(psutil.Error):  # a child may exit meanwhile
            total += psutil.Process(child).memory_info().rss
    return total


_PROC_CHILDREN = Path(f"/proc/self/task/{os.getpid()}/children").exists()


def _descendants(pid: int) -> list[int]:
    """The PIDs below ``pid``.  Linux lists each thread's children in ``/proc`` (a few
    small reads); elsewhere psutil scans the whole process table (~25 us a process,
    1.6 ms on a quiet machine: this runs on the swap path, at every load and unload)."""
    if not _PROC_CHILDREN:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            with contextlib.suppress(OSError, ValueError):
                children = [int(c) for c in Path(f"/proc/{parent}/task/{tid}/children").read_text().split()]
                out += children
                todo += children
    return out


__all__ = ["ProcessProvider", "ProcessSettings"]
