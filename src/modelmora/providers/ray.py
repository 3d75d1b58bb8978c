"""In-process PyTorch models on a Ray cluster: one named, detached actor per model.

* **Where**: :meth:`RayProvider.devices` gives every live node's devices a budget
  (``node-<name>/cpu``: Ray's ``memory`` resource on that node; ``node-<name>/cuda:<i>``:
  NVML's total, probed by a small task on each GPU node); :meth:`RayProvider.prepare`
  turns a model's ``device``/``devices`` into placement options over those devices, so
  modelmora's planner (:func:`modelmora.core.planner.plan_admission`) picks node and device
  like it picks a local GPU: best fit, then cheapest eviction, and a refusal naming the
  largest device when it fits nowhere.
* **Load**: an actor named ``<provider>:<target>`` in the ``modelmora`` namespace,
  ``lifetime="detached"`` (it outlives this process), pinned to the chosen node
  (``NodeAffinitySchedulingStrategy(soft=False)``).  modelmora's budgets are the admission
  authority: the actor reserves no Ray ``memory`` (a Ray reservation is fixed at creation
  and could not shrink to what the load measures, so Ray would refuse what the budget
  admits), and on a GPU device only a token share (``num_gpus=0.01``), which makes Ray show
  the actor a GPU.  It builds the model with the torch provider's loaders
  (:mod:`.torch_loaders`).  On a node with several GPUs Ray chooses which one backs that
  share: the budget is counted on the device the planner chose, and the handle's
  ``placement`` names the GPU Ray gave.
* **Use**: ``await handle.call("encode", texts)`` runs in the actor; ``await
  handle.run(fn, *args)`` ships ``fn(model, *args)`` there.  The proxy's ``/v1/embeddings``
  and chain steps use these (the handle is ``isolated``, like a torch worker process).
* **Unload** kills the actor (all its memory returns with its process).  **Warm tier**:
  ``sleep`` moves the weights to the actor's CPU RAM and ``wake`` back; on a CPU device
  that move is a no-op and the parked model keeps what it held in RAM (measured).
* **Truth**: :meth:`RayProvider.observe` lists the namespace's live actors of this
  provider, each measured inside itself (parameter/buffer bytes, CUDA allocated, RSS), so a
  restarted manager adopts them.  :meth:`RayProvider.watch` learns of an actor's death
  (OOM kill, node loss) the moment Ray reports it.

Not yet: nodes that join after the manager started get no budget until it restarts; a
model runs on one device of one node (no ``gpus`` > 1 across a node's GPUs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import Field

from ..errors import LoadFailed, ModelMoraError, ModelNotFound, ProviderError
from ..spec import AUTO, ModelSpec
from . import ray_cluster
from . import torch_loaders as loaders
from .base import Capabilities, Handle, Observed, Provider, ProviderSettings, Tier
from .ray_cluster import RayNode, split_device

log = logging.getLogger("modelmora.ray")

NAMESPACE = "modelmora"
GPU_SHARE = 0.01  # num_gpus of a model actor on a GPU device: Ray's CUDA_VISIBLE_DEVICES, no reservation
_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE")  # passed to actors


class RaySettings(ProviderSettings):
    address: str | None = Field(
        None,
        description="The cluster to join: 'auto' (the one `ray start` left on this machine), "
        "'host:6379' or 'ray://host:10001'; unset: start a local Ray on this machine.",
    )
    namespace: str = Field(NAMESPACE, description="Ray namespace of the model actors.")
    init_options: dict[str, Any] = Field(
        default_factory=dict, description="More keyword arguments for ray.init (e.g. num_cpus)."
    )
    actor_cpus: float = Field(0.0, ge=0, description="CPUs each model actor reserves in Ray.")
    max_concurrency: int = Field(
        8, ge=2, description="Threads of each actor: calls at once, plus one watcher."
    )
    call_timeout: float = Field(
        30.0, gt=0, description="Seconds an actor may take to report itself (observe)."
    )
    unload_wait: float = Field(30.0, gt=0, description="Seconds to wait for a killed actor to be gone.")


@dataclass(eq=False)
class RayHandle(Handle):
    """A model in a Ray actor: ``await handle.call("encode", texts)``.

    Calls run in the actor's threads (``max_concurrency`` at once); cancelling a caller
    abandons its answer.  After the actor died, calls raise a ProviderError saying so."""

    isolated: bool = True
    node: str = ""  # the device prefix of its node ("node-alpha")
    node_id: str = ""
    actor_name: str = ""
    _death: str | None = field(default=None, repr=False)

    @property
    def obj(self) -> Any:
        self.check_open()
        raise ProviderError(
            f"{self.name!r} lives in a Ray actor on {self.node}; use `await handle.call(method, *args)`",
            model=self.name, provider=self.provider,
        )  # fmt: skip

    def check_open(self) -> None:
        if self._death is not None:
            raise ProviderError(
                f"{self._death}; it is reloaded on the next use: take a new lease with manager.use()",
                model=self.name,
                provider=self.provider,
            )
        super().check_open()

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method`` of the model called in its actor (``"__call__"`` calls the object)."""
        return await self._remote("call", method, args, kwargs)

    async def run(self, fn: Any, *args: Any) -> Any:
        """``fn(model, *args)`` run in the actor (``fn`` must pickle)."""
        return await self._remote("run", fn, args)

    async def _remote(self, op: str, *args: Any) -> Any:
        self.check_open()
        ray = ray_cluster.import_ray()
        try:
            return await getattr(self.runtime, op).remote(*args)
        except ray.exceptions.RayActorError as exc:
            self._death = (
                self._death or f"{self.name}: its Ray actor on {self.node} died ({_first_line(exc)})"
            )
            self.check_open()
            raise


class RayProvider(Provider):
    """Models in named, detached Ray actors, placed per node by modelmora's planner."""

    Settings = RaySettings
    settings: RaySettings
    capabilities = Capabilities(warm_tier=True, watch=True)

    def __init__(self, name: str = "ray", settings: RaySettings | None = None):
        super().__init__(name, settings)
        self._ray: Any = None
        self._owned = False  # this provider called ray.init (and so ends it on aclose)
        self._lock = anyio.Lock()
        self._gpus: dict[str, dict[int, int]] = {}
        self._budgeted: set[str] = set()  # devices given a budget at start: the only ones placed on
        self._actor_class: Any = None
        self._suspect: set[str] = set()  # node ids whose actor died: not placed on until they answer

    # -- the cluster ----------------------------------------------------------------------

    async def _connect(self) -> Any:
        async with self._lock:
            if self._ray is None:
                s = self.settings

                def connect() -> tuple[Any, bool, dict[str, dict[int, int]]]:
                    owned = ray_cluster.connect(s.address, s.namespace, dict(s.init_options))
                    ray = ray_cluster.import_ray()
                    return ray, owned, ray_cluster.probe_gpus(ray)

                self._ray, self._owned, self._gpus = await anyio.to_thread.run_sync(connect)
                self._actor_class = self._ray.remote(_actor_class())
        return self._ray

    async def nodes(self) -> list[RayNode]:
        """The live nodes now (with the GPU totals probed when this provider connected).  A
        node where an actor just died is left out until a task pinned there runs (Ray lists
        a node whose raylet is gone as alive until its health checks fail)."""
        ray = await self._connect()
        nodes = await anyio.to_thread.run_sync(ray_cluster.live_nodes, ray, self._gpus)
        for node in nodes:
            if node.node_id in self._suspect and await anyio.to_thread.run_sync(
                ray_cluster.node_answers, ray, node.node_id
            ):
                self._suspect.discard(node.node_id)
        self._suspect &= {n.node_id for n in nodes}
        return [n for n in nodes if n.node_id not in self._suspect]

    async def devices(self) -> dict[str, int]:
        """Budgets, bytes by node-qualified device, of every live node (see the module
        docstring).  Raises ProviderUnavailable naming the address it cannot reach."""
        out: dict[str, int] = {}
        for node in await self.nodes():
            out.update(node.devices())
        self._budgeted = set(out)
        return out

    # -- placement ------------------------------------------------------------------------

    async def prepare(self, spec: ModelSpec) -> ModelSpec:
        """The spec with its placement options among live nodes' devices: its ``devices``
        (node-qualified ones on live nodes), or for any other device every live node's GPUs
        (``cpu``: their CPUs; no GPU anywhere: the CPUs); its memory estimate keyed ``auto``,
        so the planner counts all of it on the device it chooses.  A model fixed on one
        node's device (``device: node-a/cuda:0``) stays there.  Raises LoadFailed when no
        live node offers a device it may use."""
        nodes = await self.nodes()
        live = {d for node in nodes for d in node.devices()} & (self._budgeted or set())
        node_of_device, local = split_device(spec.device)
        if node_of_device is not None and not spec.devices:
            if spec.device not in live:
                raise LoadFailed(
                    f"{spec.name}: {spec.device} is on no live Ray node with a budget", model=spec.name
                )
            return spec
        if spec.devices and any(split_device(d)[0] for d in spec.devices):
            options = [d for d in spec.devices if d in live]
        else:
            cpus = [n.cpu for n in nodes if n.cpu in live]
            gpus = [n.gpu(i) for n in nodes for i in sorted(n.gpus) if n.gpu(i) in live]
            options = cpus if local == "cpu" or not gpus else gpus
        if not options:
            raise LoadFailed(
                f"{spec.name}: no live Ray node offers a device it may use "
                f"({', '.join(spec.devices or [spec.device])}; live: {', '.join(sorted(live)) or 'none'})",
                model=spec.name,
            )
        total = sum(spec.memory.values())
        return spec.model_copy(
            update={"device": AUTO, "devices": options, "memory": {AUTO: total} if total else {}}
        )

    async def serves(self, spec: ModelSpec) -> frozenset[str]:
        """The proxy answers embeddings itself, through :meth:`RayHandle.call`."""
        return frozenset({"embeddings"})

    # -- loading --------------------------------------------------------------------------

    def actor_name(self, target: str) -> str:
        return f"{self.name}:{target}"

    async def load(self, spec: ModelSpec) -> Handle:
        options = dict(spec.options)
        loaders.kind_of(spec.target, options)  # a bad kind: ConfigError before any work
        ray = await self._connect()
        node = await self._node_of(spec.device, spec.name)
        _, local = split_device(spec.device)
        resources: dict[str, Any] = {"num_cpus": self.settings.actor_cpus}
        if local.startswith("cuda"):
            resources["num_gpus"] = GPU_SHARE
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name = self.actor_name(spec.target)
        env = {k: os.environ[k] for k in _ENV if k in os.environ}
        inside = "cuda:0" if local.startswith("cuda") else "cpu"  # Ray shows the actor its GPU as 0

        def create() -> Any:
            return self._actor_class.options(
                name=name,
                namespace=self.settings.namespace,
                lifetime="detached",
                max_concurrency=self.settings.max_concurrency,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
                **resources,
            ).remote(spec.name, spec.target, inside, options, env)

        await self._name_free(name, spec.name)
        try:
            actor = await anyio.to_thread.run_sync(create)
        except ValueError as exc:  # the name is taken: an actor this manager did not adopt
            raise LoadFailed(
                f"{spec.name}: {_first_line(exc)}", model=spec.name, provider=self.name
            ) from None
        try:
            info = await actor.load.remote()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._kill(actor, name)
            if isinstance(exc, ray.exceptions.RayTaskError):
                cause = exc.cause if isinstance(exc.cause, ModelMoraError) else None
                kind = ModelNotFound if isinstance(cause, ModelNotFound) else LoadFailed
                text = str(cause) if cause is not None else _first_line(exc)
                raise kind(
                    f"{text} (in its Ray actor on {node.name})", model=spec.name, provider=self.name
                ) from None
            if isinstance(exc, ray.exceptions.RayError):
                raise LoadFailed(
                    f"{spec.name}: its Ray actor on {node.name} failed while loading ({_first_line(exc)})",
                    model=spec.name, provider=self.name,
                ) from None  # fmt: skip
            raise
        return self._handle(spec, actor, name, node, info)

    async def _name_free(self, name: str, model: str) -> None:
        """Wait until no actor holds ``name``: one on a lost node keeps it until Ray declares
        the node dead (seconds: its health checks).  One that answers is a live model this
        manager did not adopt: a LoadFailed, never a second copy."""
        ray = await self._connect()
        while name in await self._names():
            try:
                actor = await anyio.to_thread.run_sync(
                    lambda: ray.get_actor(name, namespace=self.settings.namespace)
                )
                with anyio.fail_after(2.0):
                    await actor.info.remote()
            except (ValueError, TimeoutError, ray.exceptions.RayError):
                await anyio.sleep(0.2)  # dead or dying: Ray frees the name soon
                continue
            raise LoadFailed(
                f"{model}: a live actor {name!r} already runs it in namespace {self.settings.namespace!r}; "
                "the manager adopts it at its next reconcile",
                model=model,
                provider=self.name,
            )

    def _handle(
        self, spec: ModelSpec, actor: Any, name: str, node: RayNode, info: dict[str, Any]
    ) -> RayHandle:
        device = spec.device
        handle = RayHandle(spec=spec, provider=self.name, runtime=actor, node=node.name, node_id=node.node_id)
        handle.actor_name, handle.device, handle.pid = name, device, int(info["pid"])
        handle.kind = loaders.kind_of(spec.target, dict(spec.options))
        handle.memory = _measured(device, node, info)
        gpu = f" (Ray's GPU {','.join(info['gpu_ids'])})" if info.get("gpu_ids") else ""
        handle.placement = f"Ray actor on {node.name}{gpu}, node id {node.node_id[:8]}"
        return handle

    async def _node_of(self, device: str, model: str) -> RayNode:
        prefix, _ = split_device(device)
        for node in await self.nodes():
            if node.name == prefix:
                return node
        raise LoadFailed(f"{model}: {device} is on no live Ray node", model=model, provider=self.name)

    # -- unloading ------------------------------------------------------------------------

    async def unload(self, handle: Handle) -> dict[str, int]:
        """Kill the actor; returns when Ray no longer lists it (bounded by ``unload_wait``)."""
        held = dict(handle.memory)
        if isinstance(handle, RayHandle):
            await self._kill(handle.runtime, handle.actor_name)
        handle.close()
        return held

    async def _kill(self, actor: Any, name: str) -> None:
        ray = await self._connect()

        def kill() -> None:
            ray.kill(actor, no_restart=True)

        await anyio.to_thread.run_sync(kill)
        with anyio.move_on_after(self.settings.unload_wait):
            while True:
                if name not in await self._names():
                    return
                await anyio.sleep(0.05)

    async def _names(self) -> set[str]:
        ray = await self._connect()
        listed = await anyio.to_thread.run_sync(lambda: ray.util.list_named_actors(all_namespaces=True))
        prefix = f"{self.name}:"
        return {
            a["name"]
            for a in listed
            if a["namespace"] == self.settings.namespace and a["name"].startswith(prefix)
        }

    # -- warm tier --------------------------------------------------------------------------

    async def sleep(self, handle: Handle, level: int | None = None) -> dict[str, int]:
        """Weights to the actor's CPU RAM; returns what it holds then, on its node's ``cpu``."""
        assert isinstance(handle, RayHandle)
        handle.check_open()
        info = await handle.runtime.park.remote()
        return {f"{handle.node}/cpu": max(int(info["rss"]), int(info["footprint"]))}

    async def wake(self, handle: Handle) -> dict[str, int]:
        assert isinstance(handle, RayHandle)
        handle.check_open()
        info = await handle.runtime.wake.remote()
        node = RayNode(handle.node_id, handle.node, 0)
        handle.memory = _measured(handle.device or f"{handle.node}/cpu", node, info)
        return dict(handle.memory)

    # -- truth ----------------------------------------------------------------------------

    async def observe(self) -> list[Observed]:
        """This provider's live actors in the namespace, each measured inside itself; one
        that does not answer within ``call_timeout`` (dying) is left out."""
        ray = await self._connect()
        names = sorted(await self._names())
        nodes = {n.node_id: n for n in await self.nodes()}
        found: list[Observed] = []

        async def one(name: str) -> None:
            try:
                actor = await anyio.to_thread.run_sync(
                    lambda: ray.get_actor(name, namespace=self.settings.namespace)
                )
                with anyio.fail_after(self.settings.call_timeout):
                    info = await actor.info.remote()
            except (ValueError, TimeoutError, ray.exceptions.RayError):
                return
            node = nodes.get(info["node_id"])
            if node is None:
                return
            found.append(_observed(info, node))

        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(one, name)
        return sorted(found, key=lambda o: o.target)

    async def adopt(self, observed: Observed, spec: ModelSpec) -> Handle:
        """A handle on the actor found by :meth:`observe`, on the device it runs on."""
        ray = await self._connect()
        name = self.actor_name(observed.target)
        actor = await anyio.to_thread.run_sync(lambda: ray.get_actor(name, namespace=self.settings.namespace))
        device = str(observed.details["device"])
        node = RayNode(str(observed.details["node_id"]), str(observed.details["node"]), 0)
        placed = spec.model_copy(update={"device": device, "devices": [device]})
        handle = self._handle(placed, actor, name, node, dict(observed.details["info"]))
        if observed.tier is Tier.SLEEPING:
            handle.memory = dict(observed.awake) or handle.memory
        return handle

    async def watch(self, handle: Handle) -> str:
        """Returns when the actor dies (Ray reports an OOM kill or its node's loss), with the
        reason; the handle then refuses calls with that reason."""
        if not isinstance(handle, RayHandle):
            await anyio.sleep_forever()
        assert isinstance(handle, RayHandle)
        ray = await self._connect()
        try:
            await handle.runtime.wait_dead.remote()
        except ray.exceptions.RayActorError as exc:
            reason = f"{handle.name}: its Ray actor on {handle.node} died ({_first_line(exc)})"
        except ray.exceptions.RayError as exc:
            reason = f"{handle.name}: its Ray actor on {handle.node} failed ({_first_line(exc)})"
        else:  # wait_dead never returns
            reason = f"{handle.name}: its Ray actor on {handle.node} stopped"
        handle._death = reason
        self._suspect.add(handle.node_id)
        return reason

    async def aclose(self) -> None:
        """Leaves the actors running (they are detached); disconnects, and ends the local Ray
        this provider started itself (whose actors end with it)."""
        if self._owned and self._ray is not None:
            ray = self._ray
            await anyio.to_thread.run_sync(ray.shutdown)
        self._ray, self._owned = None, False


def _measured(device: str, node: RayNode, info: dict[str, Any]) -> dict[str, int]:
    """Bytes per device of a model measured in its actor: on a GPU the CUDA bytes allocated
    (at least its weights) plus the process's RSS on its node's ``cpu``; on a CPU the
    process's RSS (at least its weights), the whole process being there for the model."""
    rss, weights = int(info["rss"]), int(info["footprint"])
    if split_device(device)[1].startswith("cuda"):
        return {device: max(int(info["cuda"]), weights), f"{node.name}/cpu": rss}
    return {device: max(rss, weights)}


def _observed(info: dict[str, Any], node: RayNode) -> Observed:
    local = "cuda:0" if str(info["device"]).startswith("cuda") else "cpu"
    device = node.cpu if local == "cpu" else node.gpu(int((info.get("gpu_ids") or ["0"])[0]))
    details = {"node": node.name, "node_id": node.node_id, "device": device, "info": info}
    if info["parked"]:
        held = {node.cpu: max(int(info["rss"]), int(info["footprint"]))}
        return Observed(str(info["target"]), held, Tier.SLEEPING, owned=True, details=details)
    return Observed(str(info["target"]), _measured(device, node, info), owned=True, details=details)


def _actor_class() -> type:
    from .ray_actor import ModelActor

    return ModelActor


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


__all__ = ["NAMESPACE", "RayHandle", "RayProvider", "RaySettings"]
