"""The Ray cluster as the ``ray`` provider sees it: connecting, its nodes, and the
node-qualified device names modelmora budgets and places models on.

Device names: ``node-<name>/cpu`` and ``node-<name>/cuda:<i>``, where ``<name>`` is the
node's Ray node name (``ray start --node-name``; Ray's default is its IP address).  Two live
nodes with one name (several raylets on one host without names) are told apart by the first
8 hex digits of their Ray node id: ``node-10.0.0.5-3f2a9c1d/cpu``.

Every function here blocks (Ray's client calls are synchronous gRPC): call them in a
worker thread.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProviderUnavailable
from ..extras import install_hint

PREFIX = "node-"


@dataclass(frozen=True)
class RayNode:
    """One live node: its Ray id, its device prefix, and the bytes Ray lets actors reserve
    there (``memory``: Ray's ``memory`` resource), its GPUs' totals by index (NVML)."""

    node_id: str
    name: str  # the device prefix: "node-alpha"
    memory: int
    gpus: dict[int, int] = field(default_factory=dict)

    @property
    def cpu(self) -> str:
        return f"{self.name}/cpu"

    def gpu(self, index: int) -> str:
        return f"{self.name}/cuda:{index}"

    def devices(self) -> dict[str, int]:
        """Budgets in bytes by device name: the CPU's is Ray's ``memory`` resource, each
        GPU's its NVML total."""
        out = {self.cpu: self.memory}
        out.update({self.gpu(i): total for i, total in sorted(self.gpus.items())})
        return out


def split_device(device: str) -> tuple[str | None, str]:
    """``"node-a/cuda:1"`` → ``("node-a", "cuda:1")``; a device of this machine → ``(None, device)``."""
    node, sep, local = device.rpartition("/")
    if not sep or not node.startswith(PREFIX):
        return None, device
    return node, local


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ProviderUnavailable(
            f"the ray provider needs Ray ({exc.name or exc} is missing): {install_hint('ray')}"
        ) from None
    return ray


def connect(address: str | None, namespace: str, init_options: dict[str, Any]) -> bool:
    """Join the cluster at ``address`` (``"auto"``, ``"host:port"``, ``"ray://host:port"``)
    or, with None, start a local Ray on this machine's resources.  Returns whether this
    call connected (False: this process was already connected, and stays so).

    Raises ProviderUnavailable, one line naming the address, when it cannot be reached: a
    TCP check bounded by 5 s comes first, since Ray's own connect retries for minutes."""
    ray = import_ray()
    if address not in (None, "auto", "local"):
        _check_reachable(address)
    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=address,
            namespace=namespace,
            logging_level=logging.ERROR,
            log_to_driver=False,
            configure_logging=False,
            **({"include_dashboard": False} if address is None else {}),
            **init_options,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "the running cluster this machine knows of" if address == "auto" else repr(address)
        raise ProviderUnavailable(f"cannot join the Ray cluster at {where}: {_first_line(exc)}") from None
    return True


def _check_reachable(address: str) -> None:
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        host, port = hostport, "10001" if address.startswith("ray://") else "6379"
    try:
        with socket.create_connection((host, int(port)), timeout=5.0):
            pass
    except OSError as exc:
        raise ProviderUnavailable(
            f"the Ray cluster at {address!r} is unreachable ({exc.strerror or exc}); start it with "
            "`ray start --head` or fix the ray provider's address"
        ) from None


def live_nodes(ray: Any, gpus: dict[str, dict[int, int]] | None = None) -> list[RayNode]:
    """The nodes alive now, named as the module docstring says.  ``gpus``: GPU totals by
    node id already probed (:func:`probe_gpus`); nodes missing there list no GPU."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    names = Counter(str(n.get("NodeName") or n["NodeManagerAddress"]) for n in alive)
    out = []
    for n in alive:
        base = str(n.get("NodeName") or n["NodeManagerAddress"])
        name = PREFIX + (base if names[base] == 1 else f"{base}-{n['NodeID'][:8]}")
        memory = int(n.get("Resources", {}).get("memory", 0))
        out.append(RayNode(n["NodeID"], name, memory, dict((gpus or {}).get(n["NodeID"], {}))))
    return sorted(out, key=lambda node: node.name)


def probe_gpus(ray: Any, timeout: float = 60.0) -> dict[str, dict[int, int]]:
    """GPU totals (index → bytes) by node id, from NVML in a small task on each node whose
    Ray resources list a GPU.  A node whose probe fails (no NVML there) lists none."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .ray_actor import gpu_totals

    probe = ray.remote(num_cpus=0, num_gpus=0)(gpu_totals)
    refs = {
        n["NodeID"]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in ray.nodes()
        if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0
    }
    out: dict[str, dict[int, int]] = {}
    for node_id, ref in refs.items():
        try:
            out[node_id] = dict(ray.get(ref, timeout=timeout))
        except Exception:  # a node without NVML: its GPUs get no budget
            out[node_id] = {}
    return out


def node_answers(ray: Any, node_id: str, timeout: float = 3.0) -> bool:
    """Whether a task pinned to ``node_id`` runs within ``timeout`` seconds (a node whose
    raylet is gone still counts as alive in ``ray.nodes()`` until its health checks fail)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(_noop).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )
    try:
        ray.get(task.remote(), timeout=timeout)
    except Exception:
        return False
    return True


def _noop() -> None:
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


__all__ = [
    "PREFIX",
    "RayNode",
    "connect",
    "import_ray",
    "live_nodes",
    "node_answers",
    "probe_gpus",
    "split_device",
]
