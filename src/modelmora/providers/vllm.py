"""vLLM in Docker: one container per model, created and stopped with the docker SDK (in
worker threads, since it blocks), with vLLM's sleep mode as the warm tier.

    providers:
      vllm: {image: "vllm/vllm-openai:v0.11.0", hf_cache: ~/.cache/huggingface}
    models:
      qwen-14b:
        provider: vllm
        target: Qwen/Qwen2.5-14B-Instruct-AWQ
        memory: 14GB
        group: heavy
        warm_tier: true                     # sleep instead of stopping (adds --enable-sleep-mode)
        options: {gpu_memory_utilization: 0.9, max_model_len: 8192, port: 8001}

* **Load** creates (never ``run()``, which pulls silently) and starts the container, or
  starts a stopped one left by ``keep_stopped``, then waits until ``/health`` answers 200
  and ``/v1/models`` lists the served name.  vLLM refuses connections while it loads, so
  refusals are waited out; a container that exits fails the load with its last log lines.
* **Unload** stops it with a grace period and removes it (or keeps it stopped), and waits
  until it is gone, so the name is free for the next load.
* **Sleep** is ``POST /sleep?level=1`` (weights to host RAM) or level 2 (weights
  discarded), sent only once ``/metrics`` shows no request running or waiting: vLLM 0.11
  can crash when it sleeps under a running batch, still answering 200, so ``/health`` is
  checked afterwards.  **Wake** is ``POST /wake_up`` after level 1; after level 2 it is
  the sequence ``docs/features/sleep_mode.md`` documents — ``/wake_up?tags=weights``,
  ``/collective_rpc {"method": "reload_weights"}``, ``/wake_up?tags=kv_cache`` — since a
  plain wake re-allocates the memory but leaves garbage where the weights were.
* **Memory while asleep**: vLLM frees the weight and KV-cache pool only; the CUDA context,
  CUDA graphs and other buffers stay on the GPU.  Measured with NVML where it is
  available, else ``sleep_gpu_allowance`` (bytes, default 1 GiB) stays counted on the
  device; level 1 adds the weights to host RAM.
* **Observe** lists containers labelled ``modelmora.provider=<this instance>``; anything
  without the label is never touched.  An engine whose ``/health`` answers 503 is dead
  (vLLM exits soon after): it is not reported resident, and a held handle is reported lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
from pydantic import Field

from ..errors import (
    ConfigError,
    LoadFailed,
    ModelNotFound,
    ProviderError,
    ProviderUnavailable,
    RuntimeUnreachable,
    UnloadFailed,
)
from ..estimate import vllm_estimate
from ..extras import install_hint
from ..memory import gpu_bytes_of
from ..net import expand
from ..spec import Duration, Interval, ModelSpec, Size, parse_duration
from .base import Capabilities, Handle, Observed, Provider, ProviderSettings, Tier
from .readiness import wait_until_ready

LABEL = "modelmora.provider"


class VLLMSettings(ProviderSettings):
    image: str = Field(
        "vllm/vllm-openai:v0.11.0", description="Pinned image tag; never pulled unless `pull`."
    )
    pull: bool = Field(False, description="Pull a missing image instead of failing.")
    docker_url: str | None = Field(
        None, description="Docker engine (default: $DOCKER_HOST or the local socket)."
    )
    host: str = Field("127.0.0.1", description="Where the servers are reached.")
    network_mode: str = Field(
        "host", description="'host' (the server binds the port) or 'bridge' (-p 127.0.0.1:port)."
    )
    hf_cache: str | None = Field("~/.cache/huggingface", description="Mounted at /root/.cache/huggingface.")
    ready_timeout: Duration = Field(
        900.0, description="Create+start to ready (vLLM cold starts take minutes)."
    )
    stop_grace: Duration = Field(30.0, description="docker stop timeout before SIGKILL.")
    keep_stopped: bool = Field(False, description="Keep stopped containers for a faster restart.")
    gpus: str | list[str] | None = Field("all", description="'all', device ids, or None for no GPU request.")
    gpu_total: int | None = Field(None, description="GPU bytes, for footprints without NVML.")
    sleep_level: int = Field(
        1,
        ge=1,
        le=2,
        description="1: weights to host RAM; 2: weights discarded (reloaded from disk on wake).",
    )
    sleep_gpu_allowance: Size = Field(
        1024**3,
        description="Bytes a sleeping engine keeps on its GPU (CUDA context, graphs) when NVML cannot measure it.",
    )
    drain_timeout: Duration = Field(
        30.0, description="How long sleep() waits for requests in flight to finish before refusing."
    )
    poll_interval: Interval = Field(0.5, description="Readiness polling period.")


class VLLMProvider(Provider):
    Settings = VLLMSettings
    settings: VLLMSettings
    capabilities = Capabilities(warm_tier=True)

    def __init__(self, name: str = "vllm", settings: VLLMSettings | None = None):
        super().__init__(name, settings)
        self._docker: Any = None
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0))
        self._held: dict[str, Handle] = {}  # by container name: reported lost if the engine dies
        self._slept: dict[str, int] = {}  # container name -> the level it was put to sleep at

    # -- docker ------------------------------------------------------------------------

    async def _client(self) -> Any:
        if self._docker is None:

            def connect() -> Any:
                try:
                    import docker
                except ImportError:
                    raise ProviderUnavailable(
                        f"the vllm provider needs the docker SDK: {install_hint('docker')}",
                        provider=self.name,
                    ) from None
                try:
                    client = (
                        docker.DockerClient(base_url=self.settings.docker_url)
                        if self.settings.docker_url
                        else docker.from_env()
                    )
                    client.ping()
                except docker.errors.DockerException as exc:
                    raise RuntimeUnreachable(
                        f"cannot reach the Docker engine: {exc}", provider=self.name
                    ) from None
                return client

            self._docker = await anyio.to_thread.run_sync(connect)
        return self._docker

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)

    def container_name(self, spec: ModelSpec) -> str:
        safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in spec.name)
        return f"modelmora-{self.name}-{safe}"

    # -- what a container runs ------------------------------------------------------------

    def sleep_mode(self, spec: ModelSpec) -> bool:
        return bool(spec.options.get("sleep_mode", spec.warm_tier))

    def port(self, spec: ModelSpec) -> int:
        port = spec.options.get("port")
        if port is None:
            raise ConfigError(
                f"{spec.name}: options.port is required (one port per vLLM container)", model=spec.name
            )
        return int(port)

    def served_name(self, spec: ModelSpec) -> str:
        return str(spec.options.get("served_name", spec.name))

    def command(self, spec: ModelSpec) -> list[str]:
        port = self.port(spec)
        custom = spec.options.get("command")
        if custom:  # another server in the container (tests: llama.cpp), with substitution
            return expand(custom, {"PORT": str(port), "MODEL": spec.target, "HOST": "0.0.0.0"})
        args = ["--model", spec.target, "--host", "0.0.0.0", "--port", str(port),
                "--served-model-name", self.served_name(spec),
                "--gpu-memory-utilization", str(spec.options.get("gpu_memory_utilization", 0.9))]  # fmt: skip
        if spec.options.get("max_model_len"):
            args += ["--max-model-len", str(spec.options["max_model_len"])]
        split = int(spec.options.get("tensor_parallel_size") or spec.gpus)
        if split > 1:  # one share of the model per GPU it was given
            args += ["--tensor-parallel-size", str(split)]
        if self.sleep_mode(spec):
            args.append("--enable-sleep-mode")
        return args + [str(a) for a in spec.options.get("extra_args", [])]

    def environment(self, spec: ModelSpec) -> dict[str, str]:
        env = {str(k): str(v) for k, v in (spec.options.get("env") or {}).items()}
        if os.environ.get("HF_TOKEN") and "HF_TOKEN" not in env:
            env["HF_TOKEN"] = os.environ["HF_TOKEN"]  # passed through, never logged
        if self.sleep_mode(spec):
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env

    def _create_kwargs(self, spec: ModelSpec) -> dict[str, Any]:
        from docker.types import DeviceRequest

        volumes: dict[str, dict[str, str]] = {}
        if self.settings.hf_cache:
            volumes[str(Path(self.settings.hf_cache).expanduser())] = {
                "bind": "/root/.cache/huggingface",
                "mode": "rw",
            }
        for host, inside in (spec.options.get("volumes") or {}).items():
            bind, _, mode = str(inside).partition(":")
            volumes[str(host)] = {"bind": bind, "mode": mode or "rw"}
        gpus = spec.options.get("gpus", self.settings.gpus)
        if "gpus" not in spec.options and spec.placed and spec.device.startswith("cuda:"):
            gpus = [d.partition(":")[2] for d in spec.runs_on]  # the GPUs placement chose, and only them
        devices = []
        if gpus == "all":
            devices = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
        elif gpus:
            devices = [DeviceRequest(device_ids=[str(g) for g in gpus], capabilities=[["gpu"]])]
        kwargs: dict[str, Any] = {
            "image": spec.options.get("image", self.settings.image),
            "command": self.command(spec),
            "name": self.container_name(spec),
            "labels": {
                LABEL: self.name,
                "modelmora.model": spec.name,
                "modelmora.target": spec.target,
                "modelmora.port": str(self.port(spec)),
                "modelmora.memory": json.dumps(dict(spec.memory)),
            },
            "environment": self.environment(spec),
            "volumes": volumes,
            "ipc_mode": "host",
            "device_requests": devices,
            "detach": True,
        }
        if spec.options.get("entrypoint"):
            kwargs["entrypoint"] = list(spec.options["entrypoint"])
        if self.settings.network_mode == "host":
            kwargs["network_mode"] = "host"
        else:
            kwargs["ports"] = {f"{self.port(spec)}/tcp": ("127.0.0.1", self.port(spec))}
        return kwargs

    # -- provider ------------------------------------------------------------------------

    async def load(self, spec: ModelSpec) -> Handle:
        client = await self._client()
        container = await self._run(self._create_or_restart, client, spec)
        timeout = parse_duration(spec.options.get("ready_timeout", self.settings.ready_timeout))
        try:
            await self._wait_ready(spec, container, timeout)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._run(self._stop_remove, client, container.name, True)
            raise
        measured = await self._run(_nvml_container_devices, container)
        handle = self._handle(spec, container.id, measured=measured)
        self._held[self.container_name(spec)] = handle
        self._slept.pop(self.container_name(spec), None)
        return handle

    def _handle(
        self,
        spec: ModelSpec,
        container_id: str,
        *,
        owned: bool = True,
        measured: dict[str, int] | None = None,
    ) -> Handle:
        memory = dict(measured) if measured else self.footprint(spec)
        return Handle(
            spec=spec, provider=self.name, endpoint=f"http://{self.settings.host}:{self.port(spec)}", api="openai",
            memory=memory, owned=owned,
            runtime=container_id, served_name=self.served_name(spec),
        )  # fmt: skip

    def _create_or_restart(self, client: Any, spec: ModelSpec) -> Any:
        import docker

        name = self.container_name(spec)
        kwargs = self._create_kwargs(spec)
        try:
            existing = client.containers.get(name)
        except docker.errors.NotFound:
            existing = None
        if existing is not None:
            if existing.labels.get(LABEL) != self.name:
                raise LoadFailed(f"{spec.name}: container name {name!r} is taken by a container modelmora does not manage", model=spec.name)  # fmt: skip
            if (
                existing.status in ("exited", "created")
                and self.settings.keep_stopped
                and existing.labels.get("modelmora.target") == spec.target
            ):
                existing.start()  # restart from a stopped container: no create, warm page cache
                return existing
            self._stop_remove(client, name, True)
        image = kwargs["image"]
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            if not self.settings.pull:
                raise ModelNotFound(
                    f"{spec.name}: image {image!r} is not present; run `docker pull {image}` or set pull: true under providers.{self.name}",
                    model=spec.name, provider=self.name,
                ) from None  # fmt: skip
            client.images.pull(image)
        container = client.containers.create(**kwargs)
        try:
            container.start()
        except docker.errors.APIError as exc:
            container.remove(force=True)
            raise LoadFailed(f"{spec.name}: docker could not start the container: {exc.explanation or exc}", model=spec.name) from None  # fmt: skip
        return container

    async def _wait_ready(self, spec: ModelSpec, container: Any, timeout: float) -> None:
        base = f"http://{self.settings.host}:{self.port(spec)}"
        health = base + str(spec.options.get("health", "/health"))
        served = self.served_name(spec)

        async def ready() -> bool:
            if (await self._http.get(health)).status_code != 200:
                return False
            listed = (await self._http.get(f"{base}/v1/models")).json().get("data") or []
            return any(m.get("id") == served for m in listed)

        async def died() -> str | None:
            status = await self._run(_status, container)
            return (
                f"the container {status or 'vanished'}"
                if status in ("exited", "dead", "removing", None)
                else None
            )

        async def output() -> str:
            return str(await self._run(_logs, container))

        await wait_until_ready(
            ready, died, output, model=spec.name, provider=self.name, not_ready="not ready",
            timeout=timeout, interval=self.settings.poll_interval, output_label="last log lines",
        )  # fmt: skip

    def _stop_remove(self, client: Any, name: str, remove: bool) -> None:
        import docker

        try:
            container = client.containers.get(name)
        except docker.errors.NotFound:
            return
        with contextlib.suppress(docker.errors.NotFound):
            container.stop(timeout=int(self.settings.stop_grace))
            if remove:
                container.remove(force=True)
        deadline = time.monotonic() + 60
        while remove:  # the name must be free before the next load of this model
            try:
                client.containers.get(name)
            except docker.errors.NotFound:
                return
            if time.monotonic() > deadline:
                raise UnloadFailed(f"container {name!r} is still there a minute after removal")
            time.sleep(0.1)

    async def unload(self, handle: Handle) -> dict[str, int]:
        name = self.container_name(handle.spec)
        if self._held.get(name) is handle:
            del self._held[name]
        self._slept.pop(name, None)
        client = await self._client()
        await self._run(
            self._stop_remove, client, self.container_name(handle.spec), not self.settings.keep_stopped
        )
        handle.close()
        return dict(handle.memory)

    async def prepare(self, spec: ModelSpec) -> ModelSpec:
        """``gpu_memory_utilization`` × the GPU's total as the estimate (vLLM pre-allocates
        it, :func:`modelmora.estimate.vllm_estimate`) unless the registry says otherwise; a
        placed model with ``options.tensor_parallel_size`` N runs on N GPUs (``gpus``)."""
        split = int(spec.options.get("tensor_parallel_size") or 1)
        if split > spec.gpus and spec.placed:
            spec = spec.model_copy(update={"gpus": split})
        total = self.settings.gpu_total or await anyio.to_thread.run_sync(_nvml_total)
        if not total:
            return spec
        utilization = float(spec.options.get("gpu_memory_utilization", 0.9))
        try:
            estimate = vllm_estimate(utilization, total, device=spec.device, gpus=spec.gpus)
        except ValueError:
            return spec
        return self.estimated(spec, estimate)

    def footprint(self, spec: ModelSpec) -> dict[str, int]:
        """Without NVML's per-process figure: the registry's estimate, else
        ``gpu_memory_utilization`` x the GPU's total (what vLLM pre-allocates)."""
        if spec.memory:
            return dict(spec.memory)
        total = self.settings.gpu_total or _nvml_total()
        if total:
            return {spec.device: int(float(spec.options.get("gpu_memory_utilization", 0.9)) * total)}
        return {}

    # -- sleep ---------------------------------------------------------------------------

    def _level(self, spec: ModelSpec) -> int:
        return int(spec.options.get("sleep_level", self.settings.sleep_level))

    async def sleep(self, handle: Handle, level: int | None = None) -> dict[str, int]:
        """``POST /sleep?level=N`` once no request is in flight; returns what stays held."""
        level = level or self._level(handle.spec)
        await self._drain(handle)
        reply = await self._post(handle, "/sleep", params={"level": level})
        if reply.status_code != 200:
            raise LoadFailed(f"{handle.name}: vLLM refused to sleep (HTTP {reply.status_code}: {reply.text[:200]}); is sleep_mode on?", model=handle.name)  # fmt: skip
        if not await self._alive(handle.endpoint):
            self._lost(
                handle, "its engine died going to sleep (vLLM answers 200 and crashes when a batch runs)"
            )
            raise LoadFailed(f"{handle.name}: the vLLM engine died going to sleep", model=handle.name, provider=self.name)  # fmt: skip
        self._slept[self.container_name(handle.spec)] = level
        return await self._asleep_memory(handle, level)

    async def _drain(self, handle: Handle) -> None:
        """Wait until vLLM's ``/metrics`` shows no request running or waiting (at most
        ``drain_timeout`` seconds), then go on; refuse if some still are."""
        busy = await self._in_flight(handle.endpoint)
        with anyio.move_on_after(self.settings.drain_timeout):
            while busy:
                await anyio.sleep(self.settings.poll_interval)
                busy = await self._in_flight(handle.endpoint)
        if busy:
            raise ProviderError(
                f"{handle.name}: vLLM still has {busy} request(s) in flight after {self.settings.drain_timeout:g}s; "
                "not putting it to sleep (vLLM 0.11 crashes when it sleeps under a running batch)",
                model=handle.name, provider=self.name,
            )  # fmt: skip

    async def _in_flight(self, endpoint: str | None) -> int:
        """``vllm:num_requests_running`` + ``vllm:num_requests_waiting`` from ``/metrics``
        (0 where the server has no such gauges)."""
        try:
            reply = await self._http.get(f"{endpoint}/metrics", timeout=5)
        except httpx.HTTPError:
            return 0
        if reply.status_code != 200:
            return 0
        total = 0.0
        for line in reply.text.splitlines():
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                with contextlib.suppress(ValueError, IndexError):
                    total += float(line.rsplit(" ", 1)[1])
        return int(total)

    async def _alive(self, endpoint: str | None) -> bool:
        """False once ``/health`` answers 503 (vLLM's ``EngineDeadError``) or nothing at all."""
        try:
            return (await self._http.get(f"{endpoint}/health", timeout=5)).status_code != 503
        except httpx.HTTPError:
            return False

    async def _post(self, handle: Handle, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.post(f"{handle.endpoint}{path}", **kwargs)
        except httpx.HTTPError as exc:
            if not await self._alive(handle.endpoint):
                self._lost(handle, f"its engine stopped answering ({type(exc).__name__})")
            raise ProviderUnavailable(f"{handle.name}: vLLM at {handle.endpoint} did not answer {path}: {exc}", model=handle.name, provider=self.name) from exc  # fmt: skip

    def _lost(self, handle: Handle, why: str) -> None:
        name = self.container_name(handle.spec)
        if self._held.get(name) is handle:
            del self._held[name]
        self.report_lost(handle, why)

    async def _asleep_memory(self, handle: Handle, level: int) -> dict[str, int]:
        """What a sleeping engine holds: on its GPU, what NVML measures for the container or
        ``sleep_gpu_allowance`` (never more than it held awake); in host RAM, the weights
        after level 1."""
        device_bytes = {d: n for d, n in handle.memory.items() if d != "cpu"}
        measured = await self._measure(handle.spec) if self._docker is not None else None
        out: dict[str, int] = {}
        for device, active in device_bytes.items():
            out[device] = min(active, measured if measured is not None else self.settings.sleep_gpu_allowance)
            measured = None  # one container, one GPU figure
        weights = sum(device_bytes.values()) if level == 1 else 0
        out["cpu"] = handle.memory.get("cpu", 0) + weights
        return out

    async def _measure(self, spec: ModelSpec) -> int | None:
        def usage() -> int | None:
            try:
                container = self._docker.containers.get(self.container_name(spec))
            except Exception:
                return None
            return _nvml_container_usage(container)

        result: int | None = await self._run(usage)
        return result

    async def wake(self, handle: Handle) -> dict[str, int]:
        """``/wake_up`` after level 1; after level 2 (or an unknown level), the documented
        reload: ``/wake_up?tags=weights``, ``/collective_rpc`` ``reload_weights``,
        ``/wake_up?tags=kv_cache``."""
        if not await self._alive(handle.endpoint):
            self._lost(handle, "its engine is dead (/health answers 503 or nothing)")
            raise LoadFailed(f"{handle.name}: the vLLM engine is dead; it cannot wake", model=handle.name, provider=self.name)  # fmt: skip
        name = self.container_name(handle.spec)
        level = self._slept.pop(name, 2)  # unknown (adopted asleep): assume the weights are gone
        timeout = parse_duration(self.settings.ready_timeout)
        steps: list[tuple[str, dict[str, Any]]] = [("/wake_up", {})]
        if level == 2:
            steps = [("/wake_up", {"params": {"tags": "weights"}}),
                     ("/collective_rpc", {"json": {"method": "reload_weights"}}),
                     ("/wake_up", {"params": {"tags": "kv_cache"}})]  # fmt: skip
        for path, kwargs in steps:
            reply = await self._post(handle, path, timeout=timeout, **kwargs)
            if reply.status_code != 200:
                hint = " (this vLLM has no /collective_rpc: use sleep_level 1)" if path == "/collective_rpc" and reply.status_code == 404 else ""  # fmt: skip
                raise LoadFailed(
                    f"{handle.name}: vLLM did not wake (POST {path}: HTTP {reply.status_code}){hint}",
                    model=handle.name,
                )
        if await self._is_sleeping(str(handle.endpoint)):
            raise LoadFailed(
                f"{handle.name}: vLLM still reports is_sleeping after wake_up", model=handle.name
            )
        return dict(handle.memory)

    async def _is_sleeping(self, endpoint: str) -> bool:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            reply = await self._http.get(f"{endpoint}/is_sleeping", timeout=2)
            return reply.status_code == 200 and bool(reply.json().get("is_sleeping"))
        return False

    # -- truth ---------------------------------------------------------------------------

    async def observe(self) -> list[Observed]:
        client = await self._client()
        containers = await self._run(
            lambda: client.containers.list(filters={"label": f"{LABEL}={self.name}", "status": "running"})
        )
        out = []
        for c in containers:
            labels = c.labels
            port = int(labels.get("modelmora.port", 0))
            try:
                memory = {k: int(v) for k, v in json.loads(labels.get("modelmora.memory", "{}")).items()}
            except ValueError:
                memory = {}
            name = str(c.name)
            if port and await self._dead(port):  # vLLM exits soon after; a refused connection is a load
                held = self._held.get(name)
                if held is not None:
                    self._lost(held, "its engine is dead (/health answers 503)")
                continue
            asleep = await self._is_sleeping(f"http://{self.settings.host}:{port}") if port else False
            awake = dict(memory) if asleep else {}  # the estimate it was started with
            if asleep:
                spec = self._held[name].spec if name in self._held else None
                level = self._slept.get(name, self._level(spec) if spec is not None else 2)
                device_bytes = {d: n for d, n in memory.items() if d != "cpu"}
                memory = {d: min(n, self.settings.sleep_gpu_allowance) for d, n in device_bytes.items()}
                memory["cpu"] = sum(device_bytes.values()) if level == 1 else 0
            out.append(
                Observed(
                    target=labels.get("modelmora.target", ""), memory=memory, owned=True,
                    tier=Tier.SLEEPING if asleep else Tier.ACTIVE, awake=awake,
                    details={"container": c.id, "model": labels.get("modelmora.model"), "port": port},
                )
            )  # fmt: skip
        return out

    async def _dead(self, port: int) -> bool:
        """``/health`` answers 503: the engine died (connection refused is a server still loading)."""
        with contextlib.suppress(httpx.HTTPError):
            return (
                await self._http.get(f"http://{self.settings.host}:{port}/health", timeout=5)
            ).status_code == 503
        return False

    async def adopt(self, observed: Observed, spec: ModelSpec) -> Handle:
        handle = self._handle(spec, str(observed.details.get("container", "")))
        self._held.setdefault(self.container_name(spec), handle)
        return handle

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._docker is not None:
            await self._run(self._docker.close)
            self._docker = None


def _status(container: Any) -> str | None:
    import docker

    try:
        container.reload()
    except docker.errors.NotFound:
        return None
    return str(container.status)


def _logs(container: Any) -> str:
    import docker

    try:
        text = container.logs(tail=12).decode(errors="replace").strip().splitlines()
    except docker.errors.DockerException:
        return "(no logs)"
    return " | ".join(text) or "(no output)"


def _nvml_container_usage(container: Any) -> int | None:
    """GPU bytes used by the container's processes, from NVML's per-process accounting
    (None where there is no NVML or no process of the container on a GPU).  Blocking."""
    return sum(_nvml_container_devices(container).values()) or None


def _nvml_container_devices(container: Any) -> dict[str, int]:
    """GPU bytes per device (``cuda:N``) the container's processes hold, from NVML's
    per-process accounting: each GPU of a tensor-parallel model counted where it is; empty
    where there is no NVML or no process of the container on a GPU.  Blocking."""
    try:
        container.reload()
        root = int(container.attrs["State"]["Pid"])
        pids = {root, *(p.pid for p in psutil.Process(root).children(recursive=True))}
    except Exception:
        return {}
    return gpu_bytes_of(pids)


def _nvml_total() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


__all__ = ["LABEL", "VLLMProvider", "VLLMSettings"]
