"""llama.cpp's C++ ``llama-server``, one process per model (what llama-swap does).

    providers:
      llamacpp:
        binary: /opt/llama.cpp/build/bin/llama-server   # optional, see below
    models:
      qwen-small:
        provider: llamacpp
        target: /models/qwen2.5-0.5b-q4.gguf
        device: cpu                  # or cuda:1 (CUDA_VISIBLE_DEVICES=1, all layers offloaded)
        options:
          ctx_size: 4096             # --ctx-size
          parallel: 2                # --parallel
          n_gpu_layers: 20           # -ngl (default: 0 on cpu, all on a GPU)
          llama_device: CUDA0        # --device (llama.cpp's own device names)
          args: ["--flash-attn", "on"]

The binary is the provider's ``binary`` setting, else ``$MODELMORA_LLAMA_SERVER``, else
``llama-server`` on ``PATH``, else the one ``.ci/setup-llama-server.sh`` built and cached
under ``~/.cache/modelmora/llama-server/<version>/``.

Everything else is the process provider's: the server starts in its own process group on a
free loopback port, is ready when ``GET /health`` answers 200 (503 while it loads), a crash
is noticed at once (``watch`` waits on the child), and a restarted manager adopts the
servers recorded in the PID state file and waits for their readiness.  Memory is the
server's RSS on the CPU, measured at load; before the first load the GGUF's size is the
estimate admission plans with.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import psutil
from pydantic import Field

from ..errors import ConfigError, LoadFailed
from ..memory import MemoryProbe
from ..net import free_port
from ..spec import Duration, ModelSpec, Size, parse_duration
from .base import Capabilities, Handle, Observed, Provider, ProviderSettings, Tier, gpu_ids
from .process import (
    ProcessProvider,
    ProcessSettings,
    _alive,
    _home,
    _LogSays,
    _Running,
    _same_process,
    _signal_group,
    _tail,
    _tree_rss,
    measure_tree,
)
from .readiness import wait_until_ready

if TYPE_CHECKING:
    from ..estimate import Estimate

ENV_BINARY = "MODELMORA_LLAMA_SERVER"
READY_LINES = (b": model loaded\n", b": listening on http")
"""What llama-server logs once it serves: ``tools/server/server.cpp`` (llama.cpp as vendored
in llama-cpp-python 0.3.36) stores ``ctx_http.is_ready`` — what makes ``/health`` answer
200 — and then logs ``model loaded`` and ``listening on http://...``; a request that arrives
before its main loop starts waits in the task queue.  So the server is ready when either
line appears (matched with the ``: `` of the logger's prefix and the line's end, so that
``no CLIP model loaded`` or a path in ``loading model '...'`` cannot pass for it).  ``/health`` polling every ``poll_interval`` remains the fallback for a build
that words it differently."""


def cache_dir() -> Path:
    """Where ``.ci/setup-llama-server.sh`` caches the binaries it builds, one per version."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "modelmora" / "llama-server"


def find_llama_server(configured: str | None = None) -> str | None:
    """The ``llama-server`` to run: ``configured``, ``$MODELMORA_LLAMA_SERVER``, ``PATH``,
    then the newest cached build; None when there is none."""
    for candidate in (configured, os.environ.get(ENV_BINARY)):
        if candidate:
            return candidate
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    cached = sorted(cache_dir().glob("*/llama-server"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in cached:
        if os.access(path, os.X_OK):
            return str(path)
    return None


class LlamaCppSettings(ProcessSettings):
    binary: str | None = Field(
        None,
        description="Path to llama-server (default: $MODELMORA_LLAMA_SERVER, PATH, then the "
        "build cached by .ci/setup-llama-server.sh).",
    )
    args: list[str] = Field(default_factory=list, description="Extra arguments for every server.")
    poll_interval: Duration = Field(
        0.1,
        description="/health polling period while starting, the fallback: the server's own "
        "'model loaded' line is the signal (a poll mid-load takes CPU from the load).",
    )
    prompt_cache_dir: str | None = Field(
        None,
        description="Saved KV caches of models with keep_prompt_cache (default: state_dir/prompt-cache).",
    )
    prompt_cache_max: Size = Field(
        2 * 1024**3, description="Disk the saved KV caches may use; the oldest files go first."
    )


class LlamaCppProvider(ProcessProvider):
    Settings = LlamaCppSettings
    settings: LlamaCppSettings

    @property
    def prompt_cache_dir(self) -> Path:
        if self.settings.prompt_cache_dir:
            return Path(self.settings.prompt_cache_dir)
        return self.state_dir / "prompt-cache"

    def binary(self) -> str:
        found = find_llama_server(self.settings.binary)
        if found is None:
            raise ConfigError(
                f"provider {self.name!r}: no llama-server found; set providers.{self.name}.binary, "
                f"${ENV_BINARY}, put llama-server on PATH, or build one with "
                "bash .ci/setup-llama-server.sh"
            )
        return found

    def _command(self, spec: ModelSpec, port: int) -> list[str]:
        opts = spec.options
        command = [self.binary(), "-m", spec.target, "--host", self.settings.host, "--port", str(port)]
        command += ["--alias", self._served_name(spec)]
        layers = opts.get("n_gpu_layers", 0 if spec.device == "cpu" else 999)
        command += ["-ngl", str(int(layers))]
        for key, flag in (
            ("ctx_size", "--ctx-size"),
            ("parallel", "--parallel"),
            ("llama_device", "--device"),
        ):
            if opts.get(key) is not None:
                command += [flag, str(opts[key])]
        if opts.get("keep_prompt_cache"):
            command += ["--slot-save-path", str(self.prompt_cache_dir) + os.sep]
        extra = [str(a) for a in (*self.settings.args, *(opts.get("args") or []))]
        shares = [spec.memory.get(d, 0) for d in spec.runs_on]
        if len(shares) > 1 and all(shares) and not {"--tensor-split", "-ts"} & set(extra):
            # the layers split over the GPUs placement chose as its shares there (MiB)
            command += ["--tensor-split", ",".join(str(max(1, n >> 20)) for n in shares)]
        return command + extra

    def _env(self, spec: ModelSpec) -> dict[str, str]:
        env = super()._env(spec)
        if spec.device.startswith("cuda:") and "CUDA_VISIBLE_DEVICES" not in (spec.options.get("env") or {}):
            env["CUDA_VISIBLE_DEVICES"] = gpu_ids(spec)
        return env

    def _served_name(self, spec: ModelSpec) -> str:
        return str(spec.options.get("served_name", spec.name))

    log_means_ready = True

    def _progress(self, running: _Running) -> Callable[[], bool]:
        """Ready when the server logs that it is (READY_LINES), with no health request to
        confirm it (every log line would mean a request per line, each taking CPU from the
        load); ``poll_interval`` polling remains the fallback."""
        return _LogSays(running.log, READY_LINES)

    async def prepare(self, spec: ModelSpec) -> ModelSpec:
        """The estimate from the GGUF (weights + KV cache for ``ctx_size`` and ``parallel``
        + the server's buffers, :func:`modelmora.estimate.gguf_estimate`) where the registry
        has none; the file's size where the GGUF cannot be read.  The measured RSS replaces
        it after the load."""
        return await _with_gguf_estimate(self, spec, [*self.settings.args, *(spec.options.get("args") or [])])

    async def load(self, spec: ModelSpec) -> Handle:
        if not await anyio.Path(spec.target).is_file():
            raise LoadFailed(
                f"{spec.name}: no GGUF file at {spec.target!r}", model=spec.name, provider=self.name
            )
        if spec.options.get("keep_prompt_cache"):
            await anyio.Path(self.prompt_cache_dir).mkdir(parents=True, exist_ok=True)
        try:
            handle = await super().load(spec)
        except LoadFailed as exc:  # name the file first: the log tail may be cut before it
            why = str(exc).removeprefix(f"{spec.name}: ")
            raise LoadFailed(
                f"{spec.name}: llama-server could not load {spec.target!r}: {why}",
                model=spec.name,
                provider=self.name,
            ) from None
        if spec.options.get("keep_prompt_cache"):
            await self._slots(handle, "restore")
        return handle

    async def unload(self, handle: Handle) -> dict[str, int]:
        if handle.spec.options.get("keep_prompt_cache") and handle.target in self.running:
            await self._slots(handle, "save")
        return await super().unload(handle)

    # -- prompt caches that survive a swap ----------------------------------------------

    def _cache_file(self, handle: Handle, slot: int) -> str:
        """One file per model and slot; the key covers the GGUF and the server's arguments
        (a cache is only valid for the same model and context)."""
        running = handle.runtime
        command = [a for a in getattr(running, "command", []) if a != str(getattr(running, "port", ""))]
        digest = hashlib.sha256(json.dumps([handle.spec.target, command[1:]]).encode()).hexdigest()[:12]
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in handle.name)
        return f"{safe}-{digest}-slot{slot}.bin"

    async def _slots(self, handle: Handle, action: str) -> None:
        """``POST /slots/{id}?action=save|restore`` for every slot (restore: those with a
        saved file).  A failure costs only the cache, never the load or the unload."""
        try:
            reply = await self._client.get(f"{handle.endpoint}/slots")
            slots = [int(s["id"]) for s in reply.json()] if reply.status_code == 200 else [0]
            for slot in slots:
                filename = self._cache_file(handle, slot)
                path = anyio.Path(self.prompt_cache_dir / filename)
                if action == "restore" and not await path.exists():
                    continue
                await self._client.post(
                    f"{handle.endpoint}/slots/{slot}?action={action}", json={"filename": filename}, timeout=60
                )
                if action == "restore":
                    await path.touch()  # recently used: evicted last
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return
        if action == "save":
            await anyio.to_thread.run_sync(self._trim_prompt_cache)

    def _trim_prompt_cache(self) -> None:
        """Oldest files first until the saved caches fit ``prompt_cache_max``."""
        try:
            files = sorted(self.prompt_cache_dir.glob("*.bin"), key=lambda p: p.stat().st_mtime)
            total = sum(p.stat().st_size for p in files)
        except OSError:
            return
        for path in files:
            if total <= self.settings.prompt_cache_max:
                break
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                path.unlink()
                total -= size


# -- router mode -------------------------------------------------------------------------


class LlamaCppRouterSettings(ProviderSettings):
    binary: str | None = Field(None, description="Path to llama-server (as for llamacpp).")
    url: str | None = Field(None, description="An existing router to drive (default: start one).")
    models_dir: str | None = Field(None, description="The GGUF folder a started router serves.")
    host: str = Field("127.0.0.1", description="Address a started router binds.")
    port: int | None = Field(None, description="Port of a started router (default: a free one).")
    models_max: int = Field(
        0, description="--models-max: 0 = unlimited, so the router never evicts behind admission."
    )
    args: list[str] = Field(default_factory=list, description="Extra arguments for the router.")
    state_dir: str | None = Field(None, description="PID record and log (default $MODELMORA_HOME/process).")
    ready_timeout: Duration = Field(120.0, description="Wait for the router or a model to be ready.")
    stop_grace: Duration = Field(10.0, description="SIGTERM to SIGKILL for a started router.")
    poll_interval: Duration = Field(0.05, description="Status polling period.")


RESIDENT = ("loading", "loaded", "sleeping")


class LlamaCppRouterProvider(Provider):
    """Drives one llama-server in router mode: ``GET /models`` is the truth about what is
    resident, ``POST /models/load|unload`` change it, ``/v1/*`` is routed by the body's
    ``model``.  A router this provider starts runs with ``--no-models-autoload`` and
    ``--models-max 0``, so only modelmora's admission decides what is resident."""

    Settings = LlamaCppRouterSettings
    settings: LlamaCppRouterSettings
    capabilities = Capabilities(watch=True, slow_adopt=True)

    def __init__(self, name: str = "llamacpp_router", settings: LlamaCppRouterSettings | None = None):
        super().__init__(name, settings)
        self.state_dir = Path(self.settings.state_dir) if self.settings.state_dir else _home() / "process"
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        self._router: _Running | None = None
        self._lock = anyio.Lock()

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"{self.name}.router.json"

    # -- the router itself -------------------------------------------------------------

    @property
    def url(self) -> str | None:
        if self.settings.url:
            return self.settings.url.rstrip("/")
        if self._router is None:
            return None
        return f"http://{self.settings.host}:{self._router.port}"

    def _find_router(self) -> _Running | None:
        """Ours if still alive, else one recorded by an earlier manager (same command line)."""
        if self._router is not None and _alive(self._router.pid):
            return self._router
        try:
            record = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not _same_process(
            int(record.get("pid", 0)), record.get("command") or []
        ):
            return None
        return _Running(int(record["pid"]), int(record["port"]), list(record["command"]), Path(record["log"]))

    async def _ensure_router(self, model: str) -> str:
        async with self._lock:
            if self.settings.url:
                return self.settings.url.rstrip("/")
            self._router = self._find_router()
            if self._router is None:
                self._router = await self._start_router(model)
            url = self.url
            assert url is not None
            return url

    async def _start_router(self, model: str) -> _Running:
        if not self.settings.models_dir:
            raise ConfigError(f"provider {self.name!r}: set models_dir (a folder of GGUFs) or url")
        binary = find_llama_server(self.settings.binary)
        if binary is None:
            raise ConfigError(f"provider {self.name!r}: no llama-server found (see the llamacpp provider)")
        port = self.settings.port or free_port(self.settings.host)
        command = [
            binary, "--models-dir", self.settings.models_dir, "--models-max", str(self.settings.models_max),
            "--no-models-autoload", "--host", self.settings.host, "--port", str(port), *self.settings.args,
        ]  # fmt: skip
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.state_dir / f"{self.name}-router-{port}.log"
        with log.open("wb") as sink:
            try:
                process = await anyio.open_process(
                    command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise LoadFailed(f"{model}: cannot start {binary!r}: {exc}", model=model) from None
        running = _Running(process.pid, port, command, log, process)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": running.pid, "port": port, "command": command, "log": str(log)}))
        tmp.replace(self.state_file)
        url = f"http://{self.settings.host}:{port}"

        async def ready() -> bool:
            return (await self._client.get(f"{url}/models")).status_code == 200

        async def died() -> str | None:
            code = process.returncode
            return None if code is None else f"the llama-server router exited with code {code}"

        async def output() -> str:
            return _tail(log)

        try:
            await wait_until_ready(
                ready, died, output, model=model, provider=self.name, not_ready=f"{url}/models did not answer",
                timeout=self.settings.ready_timeout, interval=self.settings.poll_interval,
            )  # fmt: skip
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._stop_router(running)
            raise
        return running

    async def _stop_router(self, running: _Running) -> None:
        """SIGTERM to the router's group (it stops its children), SIGKILL after the grace."""
        for sig, grace in ((signal.SIGTERM, self.settings.stop_grace), (signal.SIGKILL, 10.0)):
            _signal_group(running.pid, sig)
            with anyio.move_on_after(grace):
                await _exit(running)
            if not _alive(running.pid):
                break
        with contextlib.suppress(OSError):
            self.state_file.unlink()
        if self._router is running:
            self._router = None

    # -- models ------------------------------------------------------------------------

    def target_key(self, target: str) -> str:
        """A GGUF path names the router's model by its file name without ``.gguf``."""
        return Path(target).stem if target.endswith(".gguf") else target

    async def _models(self, url: str) -> dict[str, dict[str, Any]]:
        response = await self._client.get(f"{url}/models")
        response.raise_for_status()
        return {str(m["id"]): m for m in response.json().get("data", [])}

    def _child(self, entry: dict[str, Any]) -> int | None:
        """The PID of the router's child serving ``entry`` (found by its port)."""
        if self._router is None:
            return None
        args = [str(a) for a in (entry.get("status") or {}).get("args") or []]
        port = args[args.index("--port") + 1] if "--port" in args[:-1] else None
        try:
            for child in psutil.Process(self._router.pid).children():
                cmdline = child.cmdline()
                if (
                    port is not None
                    and "--port" in cmdline[:-1]
                    and cmdline[cmdline.index("--port") + 1] == port
                ):
                    return int(child.pid)
        except psutil.Error:
            return None
        return None

    def _path(self, entry: dict[str, Any]) -> str:
        args = [str(a) for a in (entry.get("status") or {}).get("args") or []]
        for flag in ("-m", "--model"):
            if flag in args[:-1]:
                return args[args.index(flag) + 1]
        return str(entry.get("id"))

    async def _wait_status(
        self, spec: ModelSpec, url: str, model: str, wanted: str, timeout: float
    ) -> dict[str, Any]:
        deadline = anyio.current_time() + timeout
        while True:
            entry = (await self._models(url)).get(model)
            if entry is None:
                raise LoadFailed(
                    f"{spec.name}: the router has no model {model!r}", model=spec.name, provider=self.name
                )
            status = entry.get("status") or {}
            value = status.get("value")
            if value == wanted:
                return entry
            if wanted == "loaded" and value == "unloaded":
                code = status.get("exit_code")
                log = _tail(self._router.log) if self._router is not None else "(router log not here)"
                raise LoadFailed(
                    f"{spec.name}: llama-server could not load {self._path(entry)!r} (exit code {code}); "
                    f"router log: {log}",
                    model=spec.name, provider=self.name,
                )  # fmt: skip
            if anyio.current_time() > deadline:
                raise LoadFailed(
                    f"{spec.name}: {model!r} still {value} after {timeout:.0f}s",
                    model=spec.name,
                    provider=self.name,
                )
            await anyio.sleep(self.settings.poll_interval)

    gpu_probe: MemoryProbe | None = None  # NVML per process, shared (tests put another here)

    async def _measure(self, spec: ModelSpec, pid: int | None) -> dict[str, int]:
        """The model's child process (tree), as a per-model server is measured."""
        return dict(spec.memory) if pid is None else await measure_tree(spec, pid, self.gpu_probe)

    async def _handle(
        self, spec: ModelSpec, url: str, model: str, entry: dict[str, Any], owned: bool
    ) -> Handle:
        pid = self._child(entry)
        return Handle(
            spec=spec, provider=self.name, endpoint=url, api="openai", memory=await self._measure(spec, pid),
            owned=owned, served_name=model, pid=pid, runtime=entry,
        )  # fmt: skip

    async def prepare(self, spec: ModelSpec) -> ModelSpec:
        if not spec.target.endswith(".gguf"):  # a name the router knows, not a file
            return spec
        return await _with_gguf_estimate(self, spec, self.settings.args)

    async def load(self, spec: ModelSpec) -> Handle:
        model = self.target_key(spec.target)
        url = await self._ensure_router(spec.name)
        response = await self._client.post(f"{url}/models/load", json={"model": model})
        if response.status_code != 200:
            raise LoadFailed(
                f"{spec.name}: the router refused to load {model!r}: {response.text[:300]}",
                model=spec.name, provider=self.name,
            )  # fmt: skip
        timeout = parse_duration(spec.options.get("ready_timeout", self.settings.ready_timeout))
        try:
            entry = await self._wait_status(spec, url, model, "loaded", timeout)
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(httpx.HTTPError):
                await self._client.post(f"{url}/models/unload", json={"model": model})
            raise
        return await self._handle(spec, url, model, entry, owned=True)

    async def unload(self, handle: Handle) -> dict[str, int]:
        url = self.url or await self._ensure_router(handle.name)
        model = handle.model_name
        freed = await self._measure(handle.spec, handle.pid)
        response = await self._client.post(f"{url}/models/unload", json={"model": model})
        if response.status_code == 200:
            with anyio.fail_after(self.settings.stop_grace + 10):
                while True:
                    entry = (await self._models(url)).get(model) or {}
                    if (entry.get("status") or {}).get("value") in ("unloaded", None):
                        break
                    await anyio.sleep(self.settings.poll_interval)
        handle.close()
        return freed

    async def observe(self) -> list[Observed]:
        if not self.settings.url:
            self._router = self._find_router()
        url = self.url
        if url is None:
            return []
        out = []
        for model, entry in (await self._models(url)).items():
            value = (entry.get("status") or {}).get("value")
            if value not in RESIDENT:
                continue
            pid = self._child(entry)
            out.append(
                Observed(
                    target=model, memory={"cpu": _tree_rss(pid)} if pid else {}, owned=True,
                    tier=Tier.SLEEPING if value == "sleeping" else Tier.ACTIVE, details={"pid": pid, "status": value},
                )
            )  # fmt: skip
        return out

    async def adopt(self, observed: Observed, spec: ModelSpec) -> Handle:
        url = self.url or await self._ensure_router(spec.name)
        model = self.target_key(spec.target)
        timeout = parse_duration(spec.options.get("ready_timeout", self.settings.ready_timeout))
        entry = await self._wait_status(spec, url, model, "loaded", timeout)
        return await self._handle(spec, url, model, entry, owned=True)

    async def watch(self, handle: Handle) -> str:
        """The child's PID where this machine runs it, else the router's status."""
        url = handle.endpoint
        assert url is not None
        if handle.pid is not None:
            while _alive(handle.pid):  # noqa: ASYNC110
                await anyio.sleep(0.05)
            # the router sees its child's exit a moment later, and until then refuses to load
            # the model again ("model is already running"): the table follows the router
            with anyio.move_on_after(self.settings.stop_grace + 10), contextlib.suppress(httpx.HTTPError):
                while True:
                    entry = (await self._models(url)).get(handle.model_name) or {}
                    if (entry.get("status") or {}).get("value") not in RESIDENT:
                        break
                    await anyio.sleep(self.settings.poll_interval)
            return f"llama-server for {handle.model_name!r} (pid {handle.pid}) exited"
        while True:
            await anyio.sleep(1.0)
            with contextlib.suppress(httpx.HTTPError):
                entry = (await self._models(url)).get(handle.model_name) or {}
                value = (entry.get("status") or {}).get("value")
                if value not in RESIDENT:
                    return f"the router reports {handle.model_name!r} as {value}"

    async def aclose(self) -> None:
        """Stops the router this provider runs (started here or by an earlier manager, never
        one at ``url``) once nothing is loaded in it; models still resident stay, and so
        does their router, for the next manager to adopt."""
        router = self._router
        if router is not None and not self.settings.url and self.url is not None:
            with contextlib.suppress(httpx.HTTPError):
                entries = await self._models(self.url)
                if not any((e.get("status") or {}).get("value") in RESIDENT for e in entries.values()):
                    with anyio.CancelScope(shield=True):
                        await self._stop_router(router)
        await self._client.aclose()


def _flag(args: list[str], *names: str) -> str | None:
    """The value after the last of ``names`` in a command line (``--x v`` or ``--x=v``)."""
    found = None
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in names:
            found = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return found


def gguf_options(spec: ModelSpec, args: list[str]) -> dict[str, Any]:
    """The llama-server settings a GGUF estimate depends on, from the model's options and
    the server's arguments: context, slots, KV cache types, micro-batch, unified cache."""
    args = [str(a) for a in args]
    ctx = spec.options.get("ctx_size") or _flag(args, "-c", "--ctx-size")
    parallel = spec.options.get("parallel") or _flag(args, "-np", "--parallel")
    out: dict[str, Any] = {
        "ctx": int(ctx) if ctx else None,
        "parallel": int(parallel) if parallel and int(parallel) > 0 else None,
        "cache_type_k": _flag(args, "-ctk", "--cache-type-k") or "f16",
        "cache_type_v": _flag(args, "-ctv", "--cache-type-v") or "f16",
        "ubatch": int(_flag(args, "-ub", "--ubatch-size") or 512),
    }
    if "--kv-unified" in args or "-kvu" in args:
        out["unified"] = True
    if (_flag(args, "-fa", "--flash-attn") or "auto") == "off":
        out["flash_attn"] = False
    return out


async def _with_gguf_estimate(provider: Provider, spec: ModelSpec, args: list[str]) -> ModelSpec:
    """``spec`` with the GGUF estimate recorded (and as its memory where it has none); the
    file's size where the GGUF cannot be read (the load then says what is wrong)."""
    from ..errors import ModelFileError

    try:
        options = tuple(sorted(gguf_options(spec, args).items()))

        def read() -> Estimate:
            st = os.stat(spec.target)  # a changed or replaced file is a new version: read again
            version = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            return _gguf_estimate(spec.target, version, spec.device, options)

        estimate = await anyio.to_thread.run_sync(read)
    except (ModelFileError, ValueError, OSError):
        return await _with_gguf_size(spec)
    return provider.estimated(spec, estimate)


@functools.lru_cache(maxsize=256)
def _gguf_estimate(
    path: str, version: tuple[int, int, int, int], device: str, options: tuple[tuple[str, Any], ...]
) -> Estimate:
    """:func:`modelmora.estimate.gguf_estimate` of one version of a file (its inode, size,
    mtime and ctime: a file replaced with ``cp -p`` has a new inode or ctime) with
    ``options``: each load prepares its spec, and parsing the GGUF again took 13 ms of
    every swap for a 128 MB file here.  A failed read is not kept."""
    from .. import estimate

    return estimate.gguf_estimate(path, device=device, **dict(options))


async def _with_gguf_size(spec: ModelSpec) -> ModelSpec:
    """``spec`` with its GGUF file's size (bytes) as the memory estimate, where the registry
    gives none and the file can be read."""
    if spec.memory:
        return spec
    try:
        size = (await anyio.Path(spec.target).stat()).st_size
    except OSError:
        return spec
    return spec.model_copy(update={"memory": {spec.device: size}})


async def _exit(running: _Running) -> None:
    """Until the process exits: our child is waited on (reaped), another one polled."""
    if running.process is not None:
        await running.process.wait()
        return
    while _alive(running.pid):  # noqa: ASYNC110
        await anyio.sleep(0.05)


__all__ = [
    "ENV_BINARY",
    "LlamaCppProvider",
    "LlamaCppRouterProvider",
    "LlamaCppRouterSettings",
    "LlamaCppSettings",
    "cache_dir",
    "find_llama_server",
]
