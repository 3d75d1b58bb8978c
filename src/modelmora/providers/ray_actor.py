"""What runs inside a Ray worker for the ``ray`` provider: one :class:`ModelActor` per
model, and the GPU probe run once per GPU node.

This module is shipped to the cluster by reference (the nodes import ``modelmora``), so it
imports nothing of Ray at module level and nothing from the manager's side.  The model is
built by the torch provider's loaders (:mod:`.torch_loaders`): transformers,
sentence-transformers, diffusers and ``pkg.mod:factory`` targets alike.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import psutil

from . import torch_loaders as loaders


class ModelActor:
    """One model, resident in this Ray worker process.

    Threaded (the provider creates it with ``max_concurrency`` > 1): :meth:`wait_dead`
    blocks one thread for the actor's life, so its caller learns of the actor's death the
    moment Ray does; model calls run in the other threads."""

    def __init__(self, name: str, target: str, device: str, options: dict[str, Any], env: dict[str, str]):
        for key, value in env.items():
            os.environ.setdefault(key, value)
        self.name, self.target, self.device, self.options = name, target, device, dict(options)
        self.obj: Any = None
        self.extras: dict[str, Any] = {}
        self.parked = False
        self._never = threading.Event()

    def load(self) -> dict[str, Any]:
        """Build the model on its device; returns :meth:`info`.  Raises what the loaders
        raise (``ModelNotFound``, ``LoadFailed``), which reaches the caller as a Ray task
        error of that type."""
        self.obj, self.extras = loaders.load_object(self.name, self.target, self.device, self.options)
        return self.info()

    def info(self) -> dict[str, Any]:
        """Where the model is and what it holds, measured here: ``footprint`` (bytes of its
        parameters and buffers, :func:`.torch_loaders.footprint`), ``cuda`` (bytes
        ``torch.cuda.memory_allocated`` reports on its device; 0 on the CPU), ``rss`` (bytes
        resident in this worker process), ``node_id`` (Ray's hex id of the node), ``pid``,
        ``gpu_ids`` (the GPUs Ray gave it), ``parked``, ``target``, ``device``."""
        import ray

        context = ray.get_runtime_context()
        return {
            "name": self.name,
            "target": self.target,
            "device": self.device,
            "node_id": context.get_node_id(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "footprint": loaders.footprint(self.obj) if self.obj is not None else 0,
            "cuda": loaders.cuda_allocated(self.device),
            "rss": int(psutil.Process().memory_info().rss),
            "parked": self.parked,
        }

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``method`` of the model called with ``args`` (``"__call__"`` calls the object)."""
        target = self.obj if method == "__call__" else getattr(self.obj, method)
        return target(*args, **kwargs)

    def run(self, fn: Any, args: tuple[Any, ...]) -> Any:
        """``fn(model, *args)``: a callable shipped to the actor."""
        return fn(self.obj, *args)

    def park(self) -> dict[str, Any]:
        """Weights to this process's CPU RAM (the warm tier), then what is freed is given
        back; on a CPU model the move is a no-op and it holds what it held."""
        loaders.move(self.obj, "cpu")
        loaders.release_memory()
        self.parked = True
        return self.info()

    def wake(self) -> dict[str, Any]:
        """Weights back to the model's device."""
        loaders.move(self.obj, self.device)
        self.parked = False
        return self.info()

    def wait_dead(self) -> None:
        """Never returns: its caller's reference fails when the actor dies."""
        self._never.wait()


def gpu_totals() -> list[tuple[int, int]]:
    """(index, total bytes) of every NVIDIA GPU NVML sees on this node; empty without NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        return [
            (i, int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total))
            for i in range(pynvml.nvmlDeviceGetCount())
        ]
    finally:
        pynvml.nvmlShutdown()


__all__ = ["ModelActor", "gpu_totals"]
