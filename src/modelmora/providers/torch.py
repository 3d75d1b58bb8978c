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
* **Isolation** (``options.isolation: process``): the model lives in a worker process
  forked by a pre-imported fork server (:mod:`.torch_pool`), so a new worker pays only
  for its weights; the handle's :meth:`IsolatedHandle.call` crosses a pipe with a
  protocol that cannot mix answers under cancellation; unloading ends the process, so
  all of its memory returns.  Its memory is measured by the parent (USS on the CPU, NVML
  on a GPU).  A worker that dies is noticed at once (:meth:`TorchProvider.watch`), is a
  clear error for the lease holder, and its model leaves the manager's table.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil
from pydantic import Field

from ..errors import HandleClosed, LoadFailed, ModelFileError, ModelMoraError, ModelNotFound, ProviderError
from ..estimate import Estimate, safetensors_estimate
from ..spec import AUTO, Duration, ModelSpec
from . import torch_loaders as loaders
from . import torch_pool
from .base import Capabilities, Handle, Observed, Provider, ProviderSettings, Tier
from .torch_pool import Worker

log = logging.getLogger("modelmora.torch")


class TorchSettings(ProviderSettings):
    max_concurrent_loads: int = Field(1, ge=1, description="Loads at once (they compete for RAM and disk).")
    worker_start_timeout: Duration = Field(300.0, description="How long an isolated worker may take to load.")
    worker_stop_grace: Duration = Field(5.0, description="Grace before an isolated worker is killed.")


@dataclass(eq=False)
class IsolatedHandle(Handle):
    """A model in its own process: use ``await handle.call("encode", texts)``.

    Safe to share between concurrent callers and to cancel: see :mod:`.torch_pool` for
    the protocol (requests carry ids; an abandoned request finishes and its answer is
    discarded; callers are served one at a time)."""

    isolated: bool = True
    _worker: Worker | None = field(default=None, repr=False)
    _death: str | None = field(default=None, repr=False)  # why its worker died, once it has

    @property
    def obj(self) -> Any:
        self.check_open()
        raise ProviderError(
            f"{self.name!r} lives in an isolated worker process; use `await handle.call(method, *args)`",
            model=self.name, provider=self.provider,
        )  # fmt: skip

    def check_open(self) -> None:
        if self._closed and self._death is not None:
            raise ProviderError(
                f"{self._death}; it is reloaded on the next use: take a new lease with manager.use()",
                model=self.name,
                provider=self.provider,
            )
        super().check_open()

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the model in the worker (``"__call__"`` calls the object)."""
        return await self.request("call", method, args, kwargs)

    async def request(self, op: str, *args: Any) -> Any:
        self.check_open()
        worker = self._worker
        if worker is None:
            raise HandleClosed(f"{self.name!r} has been unloaded", model=self.name, provider=self.provider)
        try:
            return await worker.request(op, *args)
        except HandleClosed:
            self.check_open()  # a death found meanwhile says so
            raise

    def alive(self) -> bool:
        return self._worker is not None and self._worker.alive()


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
        self._pooled = False  # holds a reference on the fork server (torch_pool)

    # -- loading ------------------------------------------------------------------------

    async def serves(self, spec: ModelSpec) -> frozenset[str]:
        """In this process there is no OpenAI server: the proxy itself answers embeddings."""
        return frozenset({"embeddings"})

    async def prepare(self, spec: ModelSpec) -> ModelSpec:
        """The weights' bytes from the safetensors headers of a local folder or a model in
        the Hugging Face cache, as ``options.dtype`` asks
        (:func:`modelmora.estimate.safetensors_estimate`); factories are not estimated."""
        try:
            if loaders.kind_of(spec.target, dict(spec.options)) == "factory":
                return spec
        except ModelMoraError:
            return spec  # the load reports the bad kind
        # device: auto: keyed "auto", the accelerator share placement moves to the chosen GPU
        device = spec.device if spec.device.startswith("cuda") or spec.device == AUTO else "cpu"

        def estimate() -> Estimate | None:
            folder = local_weights(spec.target)
            if folder is None:
                return None
            try:
                return safetensors_estimate(folder, dtype=spec.options.get("dtype"), device=device)
            except (ModelFileError, ValueError):
                return None

        return self.estimated(spec, await anyio.to_thread.run_sync(estimate))

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
        if not self._pooled:
            torch_pool.acquire()
            self._pooled = True
        worker = await torch_pool.Worker.start(spec.name, self.name)
        handle = IsolatedHandle(spec=spec, provider=self.name, _worker=worker)
        handle.device, handle.pid = device, worker.pid
        request = ("load", spec.name, spec.target, device, worker_opts, torch_pool.environment())
        try:
            with anyio.fail_after(self.settings.worker_start_timeout):
                info = await worker.request(*request)
        except TimeoutError:
            await worker.stop(self.settings.worker_stop_grace)
            raise LoadFailed(
                f"{spec.name}: its isolated worker did not load it within the provider's "
                f"worker_start_timeout of {self.settings.worker_start_timeout:g}s",
                model=spec.name,
                provider=self.name,
            ) from None
        except torch_pool.RemoteError as exc:
            await worker.stop(self.settings.worker_stop_grace)
            kind = ModelNotFound if exc.remote_type == "ModelNotFound" else LoadFailed
            message = str(exc).split(": ", 2)[-1]
            raise kind(f"{message} (in its isolated worker)", model=spec.name, provider=self.name) from None
        except ProviderError as exc:
            await worker.stop(self.settings.worker_stop_grace)
            raise LoadFailed(str(exc), model=spec.name, provider=self.name) from exc
        except BaseException:
            await worker.stop(self.settings.worker_stop_grace)
            raise
        # weights are mapped from their files and only become resident as they are touched:
        # count at least their size, so the budget holds them before the first inference
        handle.memory = worker.measure(device, int(info["cuda"]))
        handle.memory["cpu"] = max(handle.memory["cpu"], int(info["footprint"]) if device == "cpu" else 0)
        handle.runtime = {"footprint": int(info["footprint"])}
        return handle

    # -- unloading ----------------------------------------------------------------------

    async def unload(self, handle: Handle) -> dict[str, int]:
        self._handles.pop(handle.target, None)
        self._parked.discard(handle.target)
        if isinstance(handle, IsolatedHandle):
            held = dict(handle.memory)
            if handle._worker is not None:
                await handle._worker.stop(self.settings.worker_stop_grace)
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

    # -- warm tier ----------------------------------------------------------------------

    async def sleep(self, handle: Handle, level: int | None = None) -> dict[str, int]:
        """Weights to CPU RAM (a no-op move on a CPU-only model, which stays ready to wake)."""
        if isinstance(handle, IsolatedHandle):
            await handle.request("sleep", "cpu")
            self._parked.add(handle.target)
            assert handle._worker is not None
            return handle._worker.measure("cpu")
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
            await handle.request("wake", device)
            assert handle._worker is not None
            handle.memory = handle._worker.measure(device, handle.memory.get(device, 0))
            return dict(handle.memory)
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
            if isinstance(handle, IsolatedHandle):
                if not handle.alive():
                    continue
                if handle._worker is not None and target not in self._parked:
                    device = handle.device or "cpu"
                    measured = handle._worker.measure(device, handle.memory.get(device, 0))
                    floor = handle.runtime.get("footprint", 0) if device == "cpu" else 0
                    measured["cpu"] = max(measured["cpu"], floor)
                    handle.memory = measured
            parked = target in self._parked
            out.append(
                Observed(
                    target=target,
                    memory={} if parked else dict(handle.memory),
                    owned=True,
                    tier=Tier.SLEEPING if parked else Tier.ACTIVE,
                    awake=dict(handle.memory) if parked else {},
                )
            )
        return out

    def leaked_models(self) -> dict[str, dict[str, int]]:
        """Bytes per device of unloaded models something still references, by model."""
        out: dict[str, dict[str, int]] = {}
        for name, (ref, memory) in list(self._leaked.items()):
            if ref() is None:
                del self._leaked[name]
                continue
            out[name] = dict(memory)
        return out

    async def watch(self, handle: Handle) -> str:
        """An isolated worker's death, the moment the fork server reaps it: its pipe and
        sentinel are closed here and the provider forgets it; the reason also goes to the
        handle, so its lease holders are told the worker died (an in-process model cannot
        die on its own)."""
        worker = handle._worker if isinstance(handle, IsolatedHandle) else None
        if worker is None:
            await anyio.sleep_forever()
        assert isinstance(handle, IsolatedHandle) and worker is not None
        try:
            reason = await worker.wait_dead()
        except anyio.ClosedResourceError:  # unloaded here meanwhile
            await anyio.sleep_forever()
            raise
        handle._death = reason
        worker.release()
        if self._handles.get(handle.target) is handle:
            del self._handles[handle.target]
            self._parked.discard(handle.target)
        return reason

    async def adopt(self, observed: Observed, spec: ModelSpec) -> Handle:
        handle = self._handles.get(observed.target)
        if handle is None:
            raise ModelMoraError(f"torch provider has no live model {observed.target!r}", model=spec.name)
        return handle

    async def aclose(self) -> None:
        for handle in list(self._handles.values()):
            if isinstance(handle, IsolatedHandle) and handle._worker is not None:
                await handle._worker.stop(self.settings.worker_stop_grace)
        self._handles.clear()
        if self._pooled:
            self._pooled = False
            await anyio.to_thread.run_sync(torch_pool.release)


def local_weights(target: str) -> Path | None:
    """A target's files on this machine: a folder or file, else its snapshot in the Hugging
    Face cache (never downloaded); None when neither is here."""
    path = Path(target)
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(target, local_files_only=True))
    except (ImportError, OSError, ValueError):
        return None


def _rss() -> int:
    return int(psutil.Process(os.getpid()).memory_info().rss)


__all__ = ["IsolatedHandle", "TorchProvider", "TorchSettings"]
