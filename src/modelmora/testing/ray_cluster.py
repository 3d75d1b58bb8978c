"""A real multi-node Ray cluster on this machine for tests and benchmarks, and a tiny torch
model that says where it runs.

:func:`local_cluster` starts a head node and more nodes with ``ray.cluster_utils.Cluster``
(one raylet each, with its own ``memory`` resource and name), yields it, and at the end
shuts it down and checks that none of the processes it started is alive.  Its processes get
this modelmora on ``PYTHONPATH``, so actors import the same code as the test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil


class TinyEncoder:
    """A torch module of ``size_mb`` MB of float32 weights whose :meth:`encode` answers
    fixed-length vectors and :meth:`where` the Ray node id it runs on."""

    def __init__(self, size_mb: float = 1.0, dim: int = 8):
        import torch

        rows = max(1, int(size_mb * 1e6 / 4 / dim))
        self.module = torch.nn.Linear(dim, rows, bias=False)
        self.dim = dim

    @property
    def model(self) -> Any:  # footprint() looks here
        return self.module

    def to(self, device: str) -> TinyEncoder:
        self.module.to(device)
        return self

    def encode(self, texts: list[str]) -> list[list[float]]:
        """One vector of ``dim`` floats per text, each its length."""
        return [[float(len(t))] * self.dim for t in texts]

    def where(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def device(self) -> str:
        return str(next(self.module.parameters()).device)


def tiny_encoder(size_mb: float = 1.0) -> TinyEncoder:
    """Factory for :class:`TinyEncoder` (target ``modelmora.testing.ray_cluster:tiny_encoder``)."""
    return TinyEncoder(size_mb)


def tiny_encoder_b(size_mb: float = 1.0) -> TinyEncoder:
    """The same as :func:`tiny_encoder` under another target (another actor)."""
    return TinyEncoder(size_mb)


def tiny_encoder_c(size_mb: float = 1.0) -> TinyEncoder:
    """The same as :func:`tiny_encoder` under a third target."""
    return TinyEncoder(size_mb)


@contextlib.contextmanager
def local_cluster(nodes: Mapping[str, int], *, cpus: int = 1) -> Iterator[Any]:
    """A cluster with one node per ``nodes`` item (Ray node name → bytes of its ``memory``
    resource), the first the head, with this process connected to it (namespace
    ``modelmora``); yields the ``Cluster`` (``.address``, ``.add_node``, ``.remove_node``).  Raises AssertionError at exit if a process it started is
    still alive after shutdown."""
    import ray
    from ray.cluster_utils import Cluster

    src = str(Path(__file__).resolve().parents[2])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = src + (os.pathsep + saved if saved else "")
    before = {p.pid for p in psutil.process_iter()}
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster: Any = None
    try:
        items = list(nodes.items())
        head_name, head_memory = items[0]
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": cpus, "memory": head_memory, "node_name": head_name,
                "include_dashboard": False, "_system_config": system,
            },
        )  # fmt: skip
        for name, memory in items[1:]:
            cluster.add_node(num_cpus=cpus, memory=memory, node_name=name)
        cluster.wait_for_nodes()
        ray.init(
            address=cluster.address, namespace="modelmora", logging_level=logging.ERROR, log_to_driver=False
        )
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        left = _started_since(before)
        if left:
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            raise AssertionError(f"Ray processes left behind: {[p.pid for p in left]}")


def _started_since(before: set[int], wait: float = 15.0) -> list[psutil.Process]:
    """Processes that were not there before and are still alive after ``wait`` seconds."""
    me = os.getpid()
    deadline = time.monotonic() + wait
    while True:
        left = []
        for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
            if proc.pid in before or proc.pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            if "ray" in cmd or "raylet" in str(proc.info["name"]) or "gcs_server" in str(proc.info["name"]):
                left.append(proc)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


__all__ = ["TinyEncoder", "local_cluster", "tiny_encoder", "tiny_encoder_b", "tiny_encoder_c"]
