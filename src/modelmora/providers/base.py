"""The provider seam: a small async base class every runtime plugs in behind.

A provider knows how to make one kind of runtime load, unload and report models.  It
holds no policy (that is the manager's and the planner's); it tells the truth about its
runtime.  Contract, which the manager relies on:

* ``load`` either returns a :class:`Handle` for a ready model or raises, leaving nothing
  half-loaded behind (no process, container or runner it started).  Because a load can
  also be cancelled half-way (a timeout), the manager calls ``discard`` after every load
  that failed once the runtime was asked, before it stops counting the model's memory.
* ``unload`` returns only when the runtime has actually released the model.
* ``observe`` reports what is resident *now*, including models this process never loaded.
* errors are mapped to :mod:`modelmora.errors` at this boundary.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self

import anyio
from pydantic import BaseModel, ConfigDict

from ..errors import HandleClosed
from ..estimate import Estimate
from ..spec import ModelSpec


class Tier(enum.StrEnum):
    """Where a resident model's weights are."""

    ACTIVE = "active"  # ready to serve on its device
    SLEEPING = "sleeping"  # warm tier: vLLM sleep, torch weights offloaded to CPU RAM


@dataclass(eq=False)
class Handle:
    """A provider's grip on one resident model, lent to callers inside a lease.

    ``endpoint`` is the base URL for runtimes behind HTTP (with ``api`` saying which
    protocol: ``"openai"`` or ``"ollama"``), ``obj`` the model object for in-process
    runtimes.  The typed fields say how to call the model; ``runtime`` is the provider's
    own record (a container id, a port, a log path), opaque to everyone else.  After
    unload the handle is closed and refuses use, so a model object never outlives its
    residency by accident.
    """

    spec: ModelSpec
    provider: str
    endpoint: str | None = None
    api: str | None = None
    memory: dict[str, int] = field(default_factory=dict)  # bytes per device, measured at load
    owned: bool = True
    served_name: str | None = None  # the name the runtime serves it under (default: target)
    request_options: dict[str, Any] = field(default_factory=dict)  # every request sends these
    keep_alive: float | int | None = None  # Ollama: what requests send as keep_alive
    api_key: str | None = None
    device: str | None = None  # "cpu", "cuda:0": where an in-process model lives
    kind: str | None = None  # in-process loader kind ("transformers", "diffusers", ...)
    extras: dict[str, Any] = field(default_factory=dict)  # companions: tokenizer, processor
    pid: int | None = None  # the server or worker process, where there is one
    # where a runtime that places models itself put this one, and how that is known
    # (Ollama: its runner's NVML per-process bytes); empty when modelmora chose the device
    placement: str = ""
    runtime: Any = field(default=None, repr=False)
    _obj: Any = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def target(self) -> str:
        return self.spec.target

    @property
    def model_name(self) -> str:
        """The model name requests to the runtime carry."""
        return self.served_name or self.spec.target

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def obj(self) -> Any:
        """The in-process model object (None for server runtimes)."""
        self.check_open()
        return self._obj

    def check_open(self) -> None:
        if self._closed:
            raise HandleClosed(
                f"model {self.name!r} has been unloaded; take a new lease with manager.use()",
                model=self.name,
                provider=self.provider,
            )

    def close(self) -> None:
        """Drop the model object and refuse further use (called by the provider on unload)."""
        self._closed = True
        self._obj = None


@dataclass(frozen=True)
class Observed:
    """What a runtime reports as resident: its truth, used for reconciliation."""

    target: str
    memory: dict[str, int] = field(default_factory=dict)  # bytes per device it holds now
    tier: Tier = Tier.ACTIVE
    owned: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)
    # SLEEPING only: bytes per device it will hold once woken, where the runtime knows
    # (empty: unknown; the manager then reserves conservatively for its wake)
    awake: dict[str, int] = field(default_factory=dict)
    # when the runtime itself will let it go (unix seconds), where it has its own expiry
    # (Ollama's keep-alive: ``expires_at`` in ``/api/ps``); None: it keeps it until told
    expires_at: float | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can do beyond load/unload/observe.

    ``warm_tier``: ``sleep``/``wake`` keep a model at a lower cost (vLLM sleep mode, torch
    weights offloaded to host RAM).  ``refresh``: the runtime expires models on its own
    unless ``refresh`` is called while the manager keeps them (Ollama's keep_alive).
    ``watch``: ``watch`` returns when a model's runtime dies (a server process exits), so
    the manager notices a crash at once instead of at the next reconcile.
    ``slow_adopt``: ``adopt`` may take a while (a server found running may still be
    starting), so a manager does not hold up its start-up for it; leases wait instead.
    """

    warm_tier: bool = False
    refresh: bool = False
    watch: bool = False
    slow_adopt: bool = False


LostListener = Callable[["Handle", str], None]


class ProviderSettings(BaseModel):
    """Base for a provider's settings; unknown keys are errors, like everywhere else."""

    model_config = ConfigDict(extra="forbid")


class Provider(ABC):
    """Base class for runtimes.  Subclasses set ``Settings`` and implement the three
    abstract methods; optional ones are declared in ``capabilities``."""

    Settings: ClassVar[type[ProviderSettings]] = ProviderSettings
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, name: str, settings: ProviderSettings | None = None):
        self.name = name
        self.settings = settings if settings is not None else self.Settings()
        self._lost_listener: LostListener | None = None
        self.estimates: dict[str, Estimate] = {}  # model name → the last estimate prepare() made

    def estimated(self, spec: ModelSpec, estimate: Estimate | None) -> ModelSpec:
        """Record ``estimate`` (shown beside the registry's figure and compared with what the
        load measures) and, where the registry gives no ``memory``, make it the spec's."""
        if estimate is None:
            return spec
        self.estimates[spec.name] = estimate
        if spec.memory:
            return spec
        return spec.model_copy(update={"memory": estimate.memory()})

    def bind(self, on_lost: LostListener | None) -> None:
        """Called by the manager that owns this provider: ``on_lost(handle, reason)`` is how
        the provider reports a runtime that died on its own (see :meth:`report_lost`)."""
        self._lost_listener = on_lost

    def report_lost(self, handle: Handle, reason: str) -> None:
        """Tell the manager that the runtime behind ``handle`` is gone (its process exited,
        its container died), so the model leaves the table now instead of at the next
        reconcile.  Safe to call from the event loop's thread at any time."""
        if self._lost_listener is not None and not handle.closed:
            self._lost_listener(handle, reason)

    def target_key(self, target: str) -> str:
        """The runtime's identity for ``target``: two targets with one key are one model to
        the runtime (Ollama lists ``nomic-embed-text`` as ``nomic-embed-text:latest``).
        The manager compares observations and registry entries by this key."""
        return target

    @abstractmethod
    async def load(self, spec: ModelSpec) -> Handle:
        """Make ``spec`` resident and ready; leave nothing behind on failure."""

    @abstractmethod
    async def unload(self, handle: Handle) -> dict[str, int]:
        """Release the model; return the bytes freed per device (measured where possible)."""

    @abstractmethod
    async def observe(self) -> list[Observed]:
        """Models the runtime reports as resident right now."""

    async def discard(self, spec: ModelSpec) -> None:
        """Release whatever a load of ``spec`` that failed or was cancelled left in the
        runtime (a process started, memory taken), best effort.  The manager calls it
        after such a load, bounded by its ``unload_timeout``, keeps the model's memory
        counted until it returns, and logs what it raises.

        The default asks :meth:`observe`; if the runtime reports the target resident, it
        is adopted and unloaded.  Override where the runtime knows better (or where
        ``load`` is known to clean up after itself)."""
        key = self.target_key(spec.target)
        for seen in await self.observe():
            if self.target_key(seen.target) == key:
                await self.unload(await self.adopt(seen, spec))
                return

    async def prepare(self, spec: ModelSpec) -> ModelSpec:
        """Refine a spec before admission (e.g. pick a context length and grow the memory
        estimate with it), so the planner reserves what the load will really take."""
        return spec

    async def devices(self) -> dict[str, int]:
        """Budgets, bytes by device name, of devices the runtime brings beyond this machine's
        (a Ray cluster's nodes: ``node-<name>/cpu``, ``node-<name>/cuda:0``), asked once as
        the manager starts; a budget the config gives for the same device wins.  Default:
        none.  Raises ProviderUnavailable when the runtime cannot be reached."""
        return {}

    async def serves(self, spec: ModelSpec) -> frozenset[str] | None:
        """The OpenAI routes (``chat/completions``, ``completions``, ``embeddings``) the model
        answers, so the proxy refuses others before taking a lease; None when the runtime
        decides (the default).  An empty set: it answers none (a simulated runtime)."""
        return None

    async def adopt(self, observed: Observed, spec: ModelSpec) -> Handle:
        """A handle for a model found resident (not loaded through this process)."""
        return Handle(spec=spec, provider=self.name, memory=dict(observed.memory), owned=observed.owned)

    async def refresh(self, handle: Handle, keep_alive: float) -> None:
        """Extend the runtime's own expiry for a model the manager keeps (``refresh``)."""

    async def watch(self, handle: Handle) -> str:
        """Return, with the reason, when the runtime behind ``handle`` dies on its own
        (``watch``).  The manager runs it in a task while the model is resident and cancels
        it when the model is unloaded."""
        await anyio.sleep_forever()
        return ""

    def leaked(self) -> dict[str, int]:
        """Bytes per device the runtime still holds for models already unloaded (an
        in-process model object somebody still references).  Admission counts them as
        memory used by others until they are really gone.  Default: the sum of
        :meth:`leaked_models`."""
        out: dict[str, int] = {}
        for memory in self.leaked_models().values():
            for device, n in memory.items():
                out[device] = out.get(device, 0) + n
        return out

    def leaked_models(self) -> dict[str, dict[str, int]]:
        """The same bytes by the model whose unload left them (model name → bytes per
        device), so a refusal can name where memory really is."""
        return {}

    async def sleep(self, handle: Handle, level: int | None = None) -> dict[str, int]:
        """Move to the warm tier; returns the memory still held per device (``warm_tier``).
        ``level`` None: the provider's configured level (vLLM: 1 keeps weights in RAM, 2
        discards them)."""
        raise NotImplementedError(f"provider {self.name!r} has no sleep tier")

    async def wake(self, handle: Handle) -> dict[str, int]:
        """Return from the warm tier; returns the memory now held per device."""
        raise NotImplementedError(f"provider {self.name!r} has no sleep tier")

    async def aclose(self) -> None:
        """Release connections and clients; idempotent.  Never unloads models."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def gpu_ids(spec: ModelSpec) -> str:
    """The CUDA indices a runtime for ``spec`` is started on, as ``CUDA_VISIBLE_DEVICES``
    and the ``${GPU}`` placeholder take them: ``"1"``, or ``"0,2"`` for a model placed on
    several GPUs (:attr:`ModelSpec.runs_on`); ``""`` on the CPU."""
    return ",".join(d.partition(":")[2] for d in spec.runs_on if d.startswith("cuda:"))


__all__ = [
    "Capabilities",
    "Handle",
    "LostListener",
    "Observed",
    "Provider",
    "ProviderSettings",
    "Tier",
    "gpu_ids",
]
