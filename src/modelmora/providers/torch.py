"""In-process PyTorch models (transformers, sentence-transformers, diffusers, any factory),
optionally isolated in a worker process of their own.

* **Load** runs in a worker thread (one at a time by default), so the event loop stays
  responsive; offline operation is respected (``HF_HUB_OFFLINE=1`` → local files only, a
  missing model is a clear ``ModelNotFound``, never a hang).
* **Unload** drops every reference the provider holds, closes the handle (so the model
  object cannot outlive its residency by accident), runs ``gc.collect()``,
  ``torch.cuda.empty_cache()``/``ipc_collect()`` where CUDA is present and glibc's
  ``malloc_trim(0)``, then measures what came back.  A weak reference tells whether the
  model is still referenced somewhere else: that leak is reported by name
  (:attr:`TorchProvider.leaks` and a warning) instead of silently keeping its memory.
* **Warm tier** (``"sleep"``): the model moves to CPU RAM and back.
* **Isolation** (``options.isolation: process``): the model lives in a spawned worker
  process; the handle's :meth:`IsolatedHandle.call` crosses a pipe; unloading ends the
  process, so all of its memory returns.  A worker that dies is a clear error for the
  lease holder and disappears from :meth:`observe`, so the manager's table drops it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import psutil
from anyio.streams.buffered import BufferedByteReceiveStream
from pydantic import Field

from ..errors import HandleClosed, LoadFailed, ModelMoraError, ModelNotFound, ProviderError, UnloadFailed
from ..spec import Duration, ModelSpec
from . import torch_loaders as loaders
from .base import Capabilities, Handle, Observed, Provider, ProviderSettings, Tier
from .torch_worker import HEADER

log = logging.getLogger("modelmora.torch")


class TorchSettings(ProviderSettings):
    max_concurrent_loads: int = Field(1, ge=1, description="Loads at once (they compete for RAM and disk).")
    worker_start_timeout: Duration = Field(300.0, description="How long an isolated worker may take to load.")
    worker_stop_grace: Duration = Field(5.0, description="Grace before an isolated worker is killed.")


@dataclass(eq=False)
class IsolatedHandle(Handle):
    """A model in its own process: use ``await handle.call("encode", texts)``."""

    isolated: bool = True
    _process: anyio.abc.Process | None = field(default=None, repr=False)
    _reader: BufferedByteReceiveStream | None = field(default=None, repr=False)
    _lock: anyio.Lock | None = field(default=None, repr=False)

    @property
    def obj(self) -> Any:
        self.check_open()
        raise ProviderError(
            f"{self.name!r} lives in an isolated worker process; use `await handle.call(method, *args)`",
            model=self.name, provider=self.provider,
        )  # fmt: skip

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the model in the worker (``"__call__"`` calls the object)."""
        return await self.request(("call", method, args, kwargs))

    async def request(self, message: tuple[Any, ...]) -> Any:
        self.check_open()
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            reply = await self.exchange(message)
        if reply[0] == "ok":
            return reply[1]
        raise ProviderError(f"{self.name}: {reply[1]}: {reply[2]}", model=self.name, provider=self.provider)

    async def exchange(self, message: tuple[Any, ...]) -> Any:
        process, reader = self._process, self._reader
        if process is None or reader is None or process.stdin is None:
            raise HandleClosed(f"{self.name!r} has been unloaded", model=self.name, provider=self.provider)
        try:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            await process.stdin.send(HEADER.pack(len(data)) + data)
            (size,) = HEADER.unpack(await reader.receive_exactly(HEADER.size))
            return pickle.loads(await reader.receive_exactly(size))
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            OSError,
        ) as exc:
            raise await self.died() from exc

    async def died(self) -> ProviderError:
        code = self._process.returncode if self._process is not None else None
        if self._process is not None and code is None:
            with anyio.move_on_after(1):
                code = await self._process.wait()
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return ProviderError(
            f"the worker process of {self.name!r} died ({how})", model=self.name, provider=self.provider
        )

    def alive(self) -> bool:
        return (
            self._process is not None and self._process.returncode is None and _pid_alive(self._process.pid)
        )


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class TorchProvider(Provider):
    """Models as Python objects in this process, or one worker process per model."""

    Settings = TorchSettings
    settings: TorchSettings
    capabilities = Capabilities(warm_tier=True, watch=True)

    def __init__(self, name: str = "torch", settings: TorchSettings | None = None):
        super().__init__(name, settings)
        self._limiter = anyio.CapacityLimiter(self.settings.max_concurrent_loads)
        self._handles: dict[str, Handle] = {}  # target → live handle (in-process or isolated)
        self.leaks: dict[str, int] = {}  # model name → referrers found after unload
        self._leaked: dict[str, tuple[weakref.ref[Any], dict[str, int]]] = {}  # still referenced
        self._parked: set[str] = set()  # targets in the warm tier

    # -- loading ------------------------------------------------------------------------

    async def serves(self, spec: ModelSpec) -> frozenset[str]:
        """In this process there is no OpenAI server: the proxy itself answers embeddings."""
        return frozenset({"embeddings"})

    async def load(self, spec: ModelSpec) -> Handle:
        options = dict(spec.options)
        loaders.kind_of(spec.target, options)  # bad kind: a ConfigError before any work
        device = loaders.resolve_device(spec.device if spec.device else "cpu")
        if options.get("isolation") == "process":
            handle: Handle = await self._load_isolated(spec, device, options)
        else:
            handle = await self._load_in_process(spec, device, options)
        self._handles[spec.target] = handle
        return handle

    async def _load_in_process(self, spec: ModelSpec, device: str, options: dict[str, Any]) -> Handle:
        rss_before = _rss()

        def build() -> tuple[Any, dict[str, Any]]:
            return loaders.load_object(spec.name, spec.target, device, options)

        obj, extras = await anyio.to_thread.run_sync(build, limiter=self._limiter)
        nbytes = loaders.footprint(obj) or max(0, _rss() - rss_before)
        memory = {device if device.startswith("cuda") else "cpu": nbytes}
        return Handle(
            spec=spec, provider=self.name, memory=memory, _obj=obj,
            device=device, extras=extras, kind=loaders.kind_of(spec.target, options),
        )  # fmt: skip

    async def _load_isolated(self, spec: ModelSpec, device: str, options: dict[str, Any]) -> IsolatedHandle:
        worker_opts = {k: v for k, v in options.items() if k != "isolation"}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        process = await anyio.open_process(
            [sys.executable, "-m", "modelmora.providers.torch_worker"],
            stderr=None,
            env=env,
            start_new_session=True,
        )
        assert process.stdout is not None
        handle = IsolatedHandle(
            spec=spec, provider=self.name, _process=process, _reader=BufferedByteReceiveStream(process.stdout)
        )
        handle.device = device
        try:
            with anyio.fail_after(self.settings.worker_start_timeout):
                reply = await handle.exchange(("load", spec.name, spec.target, device, worker_opts))
        except TimeoutError:
            await self._stop_worker(handle)
            raise LoadFailed(
                f"{spec.name}: its isolated worker did not load it within the provider's "
                f"worker_start_timeout of {self.settings.worker_start_timeout:g}s",
                model=spec.name,
                provider=self.name,
            ) from None
        except ProviderError as exc:
            await self._stop_worker(handle)
            raise LoadFailed(str(exc), model=spec.name, provider=self.name) from exc
        except BaseException:
            await self._stop_worker(handle)
            raise
        if reply[0] != "ok":
            await self._stop_worker(handle)
            kind = ModelNotFound if reply[1] == "ModelNotFound" else LoadFailed
            raise kind(f"{reply[2]} (in its isolated worker)", model=spec.name, provider=self.name)
        info = reply[1]
        gpu = device if device.startswith("cuda") else None
        handle.memory = (
            {"cpu": int(info["rss"])} if gpu is None else {gpu: int(info["cuda"]), "cpu": int(info["rss"])}
        )
        handle.pid = process.pid
        return handle

    # -- unloading ----------------------------------------------------------------------

    async def unload(self, handle: Handle) -> dict[str, int]:
        self._handles.pop(handle.target, None)
        self._parked.discard(handle.target)
        if isinstance(handle, IsolatedHandle):
            held = dict(handle.memory)
            await self._stop_worker(handle)
            handle.close()
            return held
        return await anyio.to_thread.run_sync(self._drop_in_process, handle, limiter=self._limiter)

    def _drop_in_process(self, handle: Handle) -> dict[str, int]:
        device = handle.device or "cpu"
        obj = handle._obj
        try:
            ref: weakref.ref[Any] | None = weakref.ref(obj)
        except TypeError:
            ref = None  # objects without weak references cannot be checked for leaks
        rss_before, cuda_before = _rss(), loaders.cuda_allocated(device)
        handle.close()
        handle.extras.clear()
        del obj
        loaders.release_memory()
        leaked = ref() if ref is not None else None
        if leaked is not None:
            import gc

            referrers = len(gc.get_referrers(leaked))
            del leaked
            self.leaks[handle.name] = referrers
            if ref is not None:  # counted against budgets until the last reference goes
                self._leaked[handle.name] = (ref, dict(handle.memory))
            log.warning(
                "%s is still referenced after unload (%d referrer(s)): its memory cannot come back "
                "until the last reference is dropped; consider isolation: process",
                handle.name, referrers,
            )  # fmt: skip
        freed = {"cpu": max(0, rss_before - _rss())}
        if device.startswith("cuda"):
            freed[device] = max(0, cuda_before - loaders.cuda_allocated(device))
        return freed

    async def _stop_worker(self, handle: IsolatedHandle) -> None:
        """Ask the worker to exit, then SIGTERM, then SIGKILL: no orphan survives."""
        process = handle._process
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                with (
                    anyio.move_on_after(self.settings.worker_stop_grace),
                    contextlib.suppress(ProviderError, HandleClosed),
                ):
                    await handle.exchange(("close",))
            for stop in (None, process.terminate, process.kill):
                if stop is not None and process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        stop()
                with anyio.move_on_after(self.settings.worker_stop_grace):
                    await process.wait()
                if process.returncode is not None:
                    break
            await process.aclose()
        handle._process = handle._reader = None
        if process.returncode is None:
            raise UnloadFailed(
                f"the worker process of {handle.name!r} (pid {process.pid}) would not exit", model=handle.name
            )

    # -- warm tier ----------------------------------------------------------------------

    async def sleep(self, handle: Handle, level: int | None = None) -> dict[str, int]:
        """Weights to CPU RAM (a no-op move on a CPU-only model, which stays ready to wake)."""
        if isinstance(handle, IsolatedHandle):
            rss = await handle.request(("sleep", "cpu"))
            self._parked.add(handle.target)
            return {"cpu": int(rss)}
        obj = handle.obj

        def offload() -> None:  # gc and malloc_trim take long on a big heap: off the loop
            loaders.move(obj, "cpu")
            loaders.release_memory()

        await anyio.to_thread.run_sync(offload)
        self._parked.add(handle.target)
        return {"cpu": loaders.footprint(obj) or sum(handle.memory.values())}

    async def wake(self, handle: Handle) -> dict[str, int]:
        device = handle.device or "cpu"
        self._parked.discard(handle.target)
        if isinstance(handle, IsolatedHandle):
            rss = await handle.request(("wake", device))
            return {"cpu": int(rss)} if device == "cpu" else dict(handle.memory)
        obj = handle.obj
        await anyio.to_thread.run_sync(loaders.move, obj, device)
        return {
            device if device.startswith("cuda") else "cpu": loaders.footprint(obj)
            or sum(handle.memory.values())
        }

    # -- truth --------------------------------------------------------------------------

    async def observe(self) -> list[Observed]:
        """Live models; an isolated worker that died is no longer reported."""
        out = []
        for target, handle in list(self._handles.items()):
            if isinstance(handle, IsolatedHandle) and not handle.alive():
                continue
            parked = target in self._parked
            out.append(
                Observed(
                    target=target,
                    memory={} if parked else dict(handle.memory),
                    owned=True,
                    tier=Tier.SLEEPING if parked else Tier.ACTIVE,
                )
            )
        return out

    def leaked(self) -> dict[str, int]:
        """Bytes per device of unloaded models something still references."""
        out: dict[str, int] = {}
        for name, (ref, memory) in list(self._leaked.items()):
            if ref() is None:
                del self._leaked[name]
                continue
            for device, n in memory.items():
                out[device] = out.get(device, 0) + n
        return out

    async def watch(self, handle: Handle) -> str:
        """An isolated worker's exit (an in-process model cannot die on its own)."""
        process = handle._process if isinstance(handle, IsolatedHandle) else None
        if process is None:
            await anyio.sleep_forever()
        assert process is not None
        code = await process.wait()
        return f"its isolated worker (pid {process.pid}) exited with code {code}"

    async def adopt(self, observed: Observed, spec: ModelSpec) -> Handle:
        handle = self._handles.get(observed.target)
        if handle is None:
            raise ModelMoraError(f"torch provider has no live model {observed.target!r}", model=spec.name)
        return handle

    async def aclose(self) -> None:
        for handle in list(self._handles.values()):
            if isinstance(handle, IsolatedHandle):
                await self._stop_worker(handle)
        self._handles.clear()


def _rss() -> int:
    return int(psutil.Process(os.getpid()).memory_info().rss)


__all__ = ["IsolatedHandle", "TorchProvider", "TorchSettings"]
