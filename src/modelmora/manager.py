"""ModelManager: the residency table, leases, singleflight loads, eviction and the reaper.

    async with ModelManager(config) as mm:
        async with mm.use("qwen-14b") as model:   # lease: load on first use, shared
            ...                                     # never evicted while leased

The manager owns one table of :class:`~modelmora.residency.Entry` rows.  Loads run as
tasks in the manager's task group, so a caller that gives up (cancel, timeout) never
aborts a load others are waiting for, and every waiter of one load sees the same result.
Admissions go one at a time through a FIFO lock: each asks the pure planner what to evict,
waits (holding its place in line) while the memory it needs is leased, and reserves its
estimate before loading, so concurrent loads never overcommit a budget.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc

from . import events as ev
from .config import ManagerConfig
from .errors import (
    ConfigError,
    InsufficientMemory,
    LoadFailed,
    ManagerClosed,
    ModelInUse,
    ModelMoraError,
    ModelMoraTimeout,
    ProviderUnavailable,
    RecentlyFailed,
    TransientError,
    UnknownModel,
    UnloadFailed,
)
from .memory import DeviceMemory, MemoryMonitor, MemoryProbe, MemorySnapshot, resolve_budgets
from .planner import Admit, Candidate, Plan, Refuse, Wait, can_park_within, plan_admission, usage
from .providers import ProviderRegistry
from .providers import registry as default_registry
from .providers.base import Handle, Provider, Tier
from .residency import Entry, State
from .spec import ModelSpec, format_duration, format_size

log = logging.getLogger("modelmora")


class _Abandoned(Exception):
    """Every caller waiting for a load has gone away: stop waiting for memory."""


@dataclass
class _Failure:
    count: int
    at: float
    until: float
    error: BaseException


@dataclass(frozen=True)
class ModelStatus:
    name: str
    provider: str
    target: str
    state: str
    leases: int
    pinned: bool
    owned: bool
    group: str | None
    memory: dict[str, int]
    idle_s: float
    expires_in_s: float | None
    loaded_for_s: float | None
    total_leases: int

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ManagerStatus:
    models: list[ModelStatus]
    memory: MemorySnapshot
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": [m.to_dict() for m in self.models],
            "gpu_observed": self.memory.gpu_observed,
            "devices": {
                d: {
                    "budget": s.budget,
                    "used_by_modelmora": s.modelmora,
                    "peak_by_modelmora": s.peak,
                    "observed": None
                    if s.observed is None
                    else {
                        "total": s.observed.total,
                        "used": s.observed.used,
                        "free": s.observed.free,
                        "source": s.observed.source,
                    },
                }
                for d, s in self.memory.devices.items()
            },
            "failures": self.failures,
        }


@dataclass(frozen=True)
class UnloadAllResult:
    unloaded: list[str]
    in_use: list[str]
    pinned: list[str]


class Lease:
    """``async with manager.use(name) as handle``: one reference on a resident model."""

    __slots__ = ("_entry", "_keep_alive", "_manager", "_name", "_timeout")

    def __init__(self, manager: ModelManager, name: str, timeout: float | None, keep_alive: float | None):
        self._manager = manager
        self._name = name
        self._timeout = timeout
        self._keep_alive = keep_alive
        self._entry: Entry | None = None

    async def __aenter__(self) -> Handle:
        if self._entry is not None:
            raise RuntimeError("a Lease cannot be entered twice")
        entry = await self._manager._acquire(self._name, timeout=self._timeout, keep_alive=self._keep_alive)
        self._entry = entry
        assert entry.handle is not None
        return entry.handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            self._manager._release(entry)


class ModelManager:
    """Keeps the right models resident.  Use as ``async with ModelManager(config) as mm``.

    ``providers`` injects ready provider instances by name (tests, custom runtimes);
    others are built from ``config.providers`` through the provider ``registry``.
    ``probe`` reads device memory (NVML/torch/psutil by default).
    """

    def __init__(
        self,
        config: ManagerConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        *,
        providers: Mapping[str, Provider] | None = None,
        registry: ProviderRegistry | None = None,
        probe: MemoryProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
        unload_on_exit: bool = False,
    ):
        if config is None:
            config = ManagerConfig()
        elif isinstance(config, str | os.PathLike):
            config = ManagerConfig.from_yaml(config)
        elif not isinstance(config, ManagerConfig):
            config = ManagerConfig.from_dict(config)
        self.config: ManagerConfig = config
        self.events = ev.EventBus()
        self.events.subscribe(ev.LoggingSubscriber(verbose=config.verbose))
        self.monitor = MemoryMonitor(probe)
        self.unload_on_exit = unload_on_exit
        self._clock = clock
        self._registry = registry or default_registry
        self._providers: dict[str, Provider] = dict(providers or {})
        self._injected = set(self._providers)
        self._provider_errors: dict[str, ModelMoraError] = {}
        self._specs: dict[str, ModelSpec] = dict(config.models)
        self._table: dict[str, Entry] = {}
        self._failures: dict[str, _Failure] = {}
        self._measured: dict[str, tuple[dict[str, int], float]] = {}  # last load: memory, seconds
        self._budgets: dict[str, int] = {}
        self._readings: list[DeviceMemory] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._admission: anyio.Lock | None = None
        self._changed: anyio.Event | None = None
        self._waiting = 0

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise RuntimeError("this ModelManager is already running")
        self._build_providers()
        self._readings = await self.monitor.read()
        self._budgets = resolve_budgets(self.config.budgets, self.config.reserve, self._readings)
        self._admission = anyio.Lock()
        self._changed = anyio.Event()
        async with contextlib.AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            self._tg = tg
            stack.push_async_callback(self._shutdown)
            await self.reconcile()
            await tg.start(self._reaper)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            # The body's own exception is not handed to the task group, so callers see
            # UnknownModel & co. themselves rather than wrapped in an ExceptionGroup.
            await stack.__aexit__(None, None, None)

    async def _shutdown(self) -> None:
        tg = self._tg
        try:
            if self.unload_on_exit:
                with anyio.CancelScope(shield=True):
                    await self.unload_all(force=True)
        finally:
            self._tg = None
            if tg is not None:
                tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                for name, provider in self._providers.items():
                    if name not in self._injected:
                        with contextlib.suppress(Exception):
                            await provider.aclose()
            self.monitor.close()

    def _build_providers(self) -> None:
        wanted = set(self.config.providers) | {s.provider for s in self._specs.values()}
        for name in sorted(wanted - set(self._providers)):
            settings = dict(self.config.providers.get(name, {}))
            type_name = str(settings.pop("type", name))
            try:
                self._providers[name] = self._registry.create(type_name, name, settings)
            except ProviderUnavailable as exc:
                self._provider_errors[name] = exc  # raised when a model of it is used
            except ConfigError as exc:
                users = sorted(s.name for s in self._specs.values() if s.provider == name)
                where = f"models.{users[0]}.provider" if users else f"providers.{name}"
                raise ConfigError(f"{where}: {exc}") from None

    def _check_running(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise ManagerClosed(
                "the ModelManager is not running: use it inside `async with ModelManager(...)`"
            )
        return self._tg

    def provider(self, name: str) -> Provider:
        """The provider instance called ``name``."""
        if name in self._providers:
            return self._providers[name]
        if name in self._provider_errors:
            raise self._provider_errors[name]
        raise ConfigError(f"no provider named {name!r} (configured: {', '.join(sorted(self._providers))})")

    @property
    def providers(self) -> Mapping[str, Provider]:
        return dict(self._providers)

    # -- registry -----------------------------------------------------------------------

    def spec(self, name: str | None = None) -> ModelSpec:
        """The spec for ``name`` (default model when None); ``provider/target`` names a model
        inline, e.g. ``ollama/mistral-small:22b``."""
        if name is None:
            if self.config.default_model is None:
                raise ConfigError("no model named and no default_model configured")
            name = self.config.default_model
        spec = self._specs.get(name)
        if spec is not None:
            return spec
        prefix, sep, target = name.partition("/")
        if sep and target and (prefix in self._providers or prefix in self._provider_errors):
            spec = ModelSpec(name=name, provider=prefix, target=target)
            self._specs[name] = spec
            return spec
        raise UnknownModel(name, self.config.models)

    @property
    def models(self) -> Mapping[str, ModelSpec]:
        return dict(self._specs)

    # -- leases -------------------------------------------------------------------------

    def use(
        self,
        name: str | None = None,
        *,
        timeout: float | None = None,
        keep_alive: float | None = None,
    ) -> Lease:
        """A lease on ``name``: loads it on first use, shares it, never evicts it while held.

        ``timeout`` bounds the wait for memory and the load; ``keep_alive`` overrides how
        long the model stays once idle."""
        return Lease(self, name if name is not None else self.spec().name, timeout, keep_alive)

    async def _acquire(
        self,
        name: str,
        *,
        timeout: float | None = None,
        keep_alive: float | None = None,
        pin: bool = False,
        retry: bool = False,
    ) -> Entry:
        entry = self._table.get(name)
        if entry is not None and entry.state is State.READY and self._tg is not None:
            # Hot path: resident model, no awaits, no allocation beyond the event.
            entry.leases += 1
            entry.total_leases += 1
            entry.last_used = self._clock()
            if keep_alive is not None:
                entry.keep_alive = keep_alive
            if pin:
                entry.pinned = True
            self.events.emit(ev.LeaseAcquired(model=name, leases=entry.leases))
            return entry
        return await self._acquire_slow(name, timeout, keep_alive, pin, retry)

    async def _acquire_slow(
        self, name: str, timeout: float | None, keep_alive: float | None, pin: bool, retry: bool
    ) -> Entry:
        tg = self._check_running()
        spec = self.spec(name)
        provider_name = spec.provider
        while True:
            entry = self._table.get(name)
            if entry is None:
                provider = self.provider(provider_name)  # fail fast when its runtime is unavailable
                self._check_backoff(name, retry)
                entry = Entry(spec, provider_name)
                entry.can_sleep = spec.warm_tier and provider.capabilities.warm_tier
                entry.leases += 1
                self._table[name] = entry
                tg.start_soon(self._load_entry, entry, name=f"modelmora-load-{name}")
            elif entry.state is State.UNLOADING:
                await entry.gone.wait()
                continue
            elif entry.state is State.PARKING:
                await entry.settled.wait()
                continue
            elif entry.state is State.SLEEPING:
                entry.leases += 1
                entry.ready = anyio.Event()
                entry.error = None
                entry.state = State.WAKING  # admitted like a load, then woken
                tg.start_soon(self._load_entry, entry, name=f"modelmora-wake-{name}")
            else:
                entry.leases += 1
            break
        entry.total_leases += 1
        if keep_alive is not None:
            entry.keep_alive = keep_alive
        if pin:
            entry.pinned = True
        try:
            if entry.state is not State.READY:
                try:
                    with anyio.fail_after(timeout):
                        await entry.ready.wait()
                except TimeoutError:
                    raise ModelMoraTimeout(
                        f"timed out after {format_duration(timeout)} waiting for {name!r} to load "
                        f"(state: {entry.state.value})",
                        model=name,
                    ) from None
                if entry.error is not None:
                    raise entry.error
            entry.last_used = self._clock()
            self.events.emit(ev.LeaseAcquired(model=name, leases=entry.leases))
            return entry
        except BaseException:
            self._drop_lease(entry)
            raise

    def _release(self, entry: Entry) -> None:
        entry.last_used = self._clock()
        self.events.emit(ev.LeaseReleased(model=entry.name, leases=entry.leases - 1))
        self._drop_lease(entry)

    def _drop_lease(self, entry: Entry) -> None:
        if entry.leases <= 0:
            raise RuntimeError(f"lease count of {entry.name!r} would go negative")
        entry.leases -= 1
        if entry.leases:
            return
        self._notify()
        if (
            self._table.get(entry.name) is entry
            and entry.state is State.READY
            and entry.ttl(self.config.idle_ttl) == 0
            and entry.owned
            and not entry.pinned
            and self._tg is not None
        ):
            self._tg.start_soon(self._unload_idle, entry)

    def _notify(self) -> None:
        """Wake whoever waits for memory or for the table to change."""
        if self._waiting and self._changed is not None:
            self._changed.set()
            self._changed = anyio.Event()

    # -- manual control -----------------------------------------------------------------

    async def load(
        self,
        name: str | None = None,
        *,
        pin: bool = False,
        keep_alive: float | None = None,
        retry: bool = False,
        timeout: float | None = None,
    ) -> Handle:
        """Make ``name`` resident without holding a lease (it stays for its keep-alive, or
        until evicted; ``pin=True`` keeps it until unpinned or force-unloaded).
        ``retry=True`` skips the cool-down after a recent failure."""
        spec = self.spec(name)
        entry = await self._acquire(spec.name, timeout=timeout, keep_alive=keep_alive, pin=pin, retry=retry)
        handle = entry.handle
        self._release(entry)
        assert handle is not None
        return handle

    async def unload(self, name: str, *, force: bool = False) -> bool:
        """Unload ``name``; False when it was not resident.  A leased model raises
        :class:`ModelInUse` unless ``force``, which closes the holders' handles."""
        self._check_running()
        entry = self._table.get(name)
        if entry is None:
            self.spec(name)  # unknown names still get a clear error
            return False
        if entry.leases and not force:
            raise ModelInUse(name, entry.leases)
        if entry.state in (State.WAITING, State.LOADING, State.WAKING):
            await entry.ready.wait()
            if self._table.get(name) is not entry:
                return False
        await self._unload_entry(entry, reason="forced" if force and entry.leases else "manual", force=force)
        return True

    async def unload_all(self, *, force: bool = False) -> UnloadAllResult:
        """Unload every resident model; without ``force`` leased and pinned ones stay."""
        self._check_running()
        unloaded, in_use, pinned = [], [], []
        for entry in list(self._table.values()):
            if not force and entry.leases:
                in_use.append(entry.name)
                continue
            if not force and entry.pinned:
                pinned.append(entry.name)
                continue
            if entry.state in (State.WAITING, State.LOADING, State.WAKING):
                await entry.ready.wait()
                if self._table.get(entry.name) is not entry:
                    continue
            if entry.state is State.UNLOADING:
                await entry.gone.wait()
                continue
            await self._unload_entry(entry, reason="unload-all", force=force)
            unloaded.append(entry.name)
        return UnloadAllResult(unloaded, in_use, pinned)

    async def park(self, name: str) -> bool:
        """Move a resident, unleased model to its warm tier now; False when it cannot park
        (no warm tier, leased, or not ready).  The next use wakes it."""
        self._check_running()
        entry = self._table.get(name)
        provider = self._providers.get(entry.provider) if entry is not None else None
        if entry is None or provider is None or not provider.capabilities.warm_tier:
            return False
        if entry.state is not State.READY or entry.leases:
            return False
        await self._park_entry(entry, reason="manual")
        return self.is_parked(name)

    def is_parked(self, name: str) -> bool:
        """True while ``name`` sits in its warm tier."""
        entry = self._table.get(name)
        return entry is not None and entry.state is State.SLEEPING

    def pin(self, name: str) -> None:
        entry = self._table.get(name)
        if entry is None:
            raise ModelMoraError(f"{name!r} is not resident; use load(name, pin=True)", model=name)
        entry.pinned = True

    def unpin(self, name: str) -> None:
        entry = self._table.get(name)
        if entry is not None:
            entry.pinned = False
            self._notify()

    def loaded(self) -> list[str]:
        """Names of resident models (ready or in a warm tier)."""
        return [e.name for e in self._table.values() if e.state in (State.READY, State.SLEEPING)]

    def is_loaded(self, name: str) -> bool:
        entry = self._table.get(name)
        return entry is not None and entry.state in (State.READY, State.SLEEPING)

    def leases(self, name: str) -> int:
        entry = self._table.get(name)
        return entry.leases if entry else 0

    def entries(self) -> list[Entry]:
        """The table's rows (read-only use: for status pages and tests)."""
        return list(self._table.values())

    @property
    def budgets(self) -> dict[str, int]:
        return dict(self._budgets)

    def usage(self) -> dict[str, int]:
        """Bytes per device held by entries, as the manager believes."""
        return usage(e.resident() for e in self._table.values())

    def plan(self, name: str, memory: Mapping[str, int] | None = None) -> Plan:
        """What loading ``name`` now would do, without doing it (``memory``: a better
        estimate than the registry's, when the caller has one)."""
        spec = self.spec(name)
        if memory is None:
            memory = self.footprint(name)[0]
        return plan_admission(
            [e.resident() for e in self._table.values() if e.name != name],
            Candidate(spec.name, memory, spec.group),
            self._budgets,
            max_loaded=self.config.max_loaded_models,
            external=self._external(),
        )

    def footprint(self, name: str) -> tuple[dict[str, int], float | None]:
        """Memory per device and load seconds for ``name``: measured when it has been loaded
        by this manager, else the spec's estimates (what planners ahead of time need)."""
        spec = self.spec(name)
        entry = self._table.get(name)
        measured, seconds = self._measured.get(name, (None, spec.load_time))
        if entry is not None and entry.state is State.READY:
            return dict(entry.active_memory), seconds
        return dict(measured or spec.memory), seconds

    def headroom(self, exclude: Iterable[str] = ()) -> dict[str, int]:
        """Budget per device left once memory that cannot be reclaimed is counted: other
        processes, and models not in ``exclude`` that are leased, pinned or in transition.
        Idle models are not counted, since admission may evict them."""
        skip = set(exclude)
        held = usage(
            r
            for r in (e.resident() for e in self._table.values() if e.name not in skip)
            if not r.is_evictable()
        )
        external = self._external()
        return {
            device: max(0, budget - held.get(device, 0) - external.get(device, 0))
            for device, budget in self._budgets.items()
        }

    def can_fit(self, name: str) -> bool:
        """True when ``name`` fits now without evicting anything."""
        plan = self.plan(name)
        return isinstance(plan, Admit) and not plan.evict

    async def status(self) -> ManagerStatus:
        self._readings = await self.monitor.read()
        now = self._clock()
        models = [
            ModelStatus(
                name=e.name,
                provider=e.provider,
                target=e.spec.target,
                state=e.state.value,
                leases=e.leases,
                pinned=e.pinned,
                owned=e.owned,
                group=e.spec.group,
                memory=dict(e.memory),
                idle_s=e.idle_for(now),
                expires_in_s=e.expires_in(now, self.config.idle_ttl),
                loaded_for_s=None if e.loaded_at is None else now - e.loaded_at,
                total_leases=e.total_leases,
            )
            for e in self._table.values()
        ]
        failures = {
            name: {
                "failures": f.count,
                "error": str(f.error),
                "retry_in_s": max(0.0, f.until - now),
            }
            for name, f in self._failures.items()
        }
        return ManagerStatus(
            models, self.monitor.snapshot(self._budgets, self.usage(), self._readings), failures
        )

    # -- loading ------------------------------------------------------------------------

    def _check_backoff(self, name: str, retry: bool) -> None:
        failure = self._failures.get(name)
        if failure is None or retry:
            return
        remaining = failure.until - self._clock()
        if remaining > 0:
            raise RecentlyFailed(
                f"{name!r} failed to load {format_duration(self._clock() - failure.at)} ago "
                f"({failure.error}); next attempt allowed in {format_duration(remaining)}, "
                "or pass retry=True",
                model=name,
                retry_after=remaining,
                cause=failure.error,
            )

    def _record_failure(self, name: str, error: BaseException) -> float:
        previous = self._failures.get(name)
        count = previous.count + 1 if previous else 1
        cooldown = min(self.config.failure_cooldown * 2.0 ** (count - 1), self.config.failure_cooldown_max)
        now = self._clock()
        self._failures[name] = _Failure(count, now, now + cooldown, error)
        return cooldown

    async def _load_entry(self, entry: Entry) -> None:
        """Admit and load ``entry`` (or wake it, when it is parked in its warm tier)."""
        spec = entry.spec
        waking = entry.state is State.WAKING
        timeout = spec.load_timeout if math.isfinite(spec.load_timeout) else None
        woke = False
        try:
            provider = self.provider(entry.provider)
            if not waking:
                spec = entry.spec = await provider.prepare(spec)
                entry.memory = dict(spec.memory)
                entry.active_memory = dict(spec.memory)
            await self._admit(entry)
            started = self._clock()
            if waking:
                assert entry.handle is not None
                woke = True  # from here on, a failure leaves the runtime in an unknown tier
                try:
                    with anyio.fail_after(timeout):
                        measured = await provider.wake(entry.handle)
                except TimeoutError:
                    raise LoadFailed(
                        f"waking {spec.name!r} took longer than its load_timeout",
                        model=spec.name,
                        provider=entry.provider,
                    ) from None
                entry.memory = dict(measured) or dict(entry.active_memory)
            else:
                self.events.emit(
                    ev.Loading(model=spec.name, provider=entry.provider, estimate=dict(spec.memory))
                )
                try:
                    with anyio.fail_after(timeout):
                        handle = await provider.load(spec)
                except TimeoutError:
                    raise LoadFailed(
                        f"loading {spec.name!r} took longer than its load_timeout of "
                        f"{format_duration(spec.load_timeout)}",
                        model=spec.name,
                        provider=entry.provider,
                    ) from None
                entry.handle = handle
                entry.memory = dict(handle.memory) or dict(spec.memory)
                entry.owned = handle.owned
                entry.loaded_at = self._clock()
            entry.active_memory = dict(entry.memory)
            entry.last_used = self._clock()
            entry.state = State.READY
            self._failures.pop(spec.name, None)
            self.monitor.note_usage(self.usage())
            duration = self._clock() - started
            if waking:
                self.events.emit(ev.Woke(model=spec.name, duration_s=duration, memory=dict(entry.memory)))
            else:
                self._measured[spec.name] = (dict(entry.memory), duration)
                self.events.emit(
                    ev.Loaded(
                        model=spec.name,
                        provider=entry.provider,
                        duration_s=duration,
                        memory=dict(entry.memory),
                    )
                )
        except BaseException as exc:
            error: BaseException = exc
            if waking and not woke:
                entry.state = State.SLEEPING  # never left the warm tier
            else:
                if woke:
                    await self._discard(entry)
                self._remove(entry)
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            if cancelled:
                error = ManagerClosed(
                    f"the manager shut down while {spec.name!r} was loading", model=spec.name
                )
            elif isinstance(exc, _Abandoned):
                error = ModelMoraError(
                    f"load of {spec.name!r} abandoned: nobody waits for it", model=spec.name
                )
            elif not isinstance(
                exc, InsufficientMemory | ModelMoraTimeout | UnknownModel | ConfigError | TransientError
            ):
                if not isinstance(exc, ModelMoraError):
                    error = LoadFailed(
                        f"loading {spec.name!r} failed: {type(exc).__name__}: {exc}",
                        model=spec.name,
                        provider=entry.provider,
                    )
                    error.__cause__ = exc
                retry_after = self._record_failure(spec.name, error)
                self.events.emit(
                    ev.LoadFailed(
                        model=spec.name,
                        provider=entry.provider,
                        error=str(error),
                        retry_after_s=retry_after,
                    )
                )
            else:
                self.events.emit(ev.LoadFailed(model=spec.name, provider=entry.provider, error=str(error)))
            entry.error = error
            if cancelled:
                raise
        else:
            await self._rebalance(entry)
        finally:
            entry.ready.set()
            self._notify()

    def _plan_for(self, entry: Entry, memory: Mapping[str, int] | None = None) -> Plan:
        need = dict(entry.active_memory if memory is None else memory)
        if entry.state is State.WAKING:  # its parked copy stays in RAM until the wake completes
            for device, held in entry.memory.items():
                need[device] = max(need.get(device, 0), held)
        return plan_admission(
            [e.resident() for e in self._table.values() if e is not entry],
            Candidate(entry.name, need, entry.spec.group),
            self._budgets,
            max_loaded=self.config.max_loaded_models,
            external=self._external(),
        )

    def _external(self) -> dict[str, int]:
        """Memory on measured GPUs held by processes other than our entries."""
        ours = self.usage()
        return {
            r.device: max(0, r.used - ours.get(r.device, 0))
            for r in self._readings
            if r.device.startswith("cuda:") and r.device in self._budgets
        }

    async def _admit(self, entry: Entry) -> None:
        """Wait for our turn and for memory, evict what the planner chose, reserve ours."""
        assert self._admission is not None
        deadline = self._clock() + self.config.wait_timeout
        reconciled = False
        last_blockers: tuple[str, ...] | None = None
        async with self._admission:
            while True:
                if entry.leases == 0:
                    raise _Abandoned
                plan = self._plan_for(entry)
                if (not isinstance(plan, Admit) or plan.evict) and not reconciled:
                    reconciled = True  # runtime truth before evicting or waiting
                    await self.reconcile()
                    continue
                match plan:
                    case Admit(evict=(), sleep=()):
                        if entry.state is State.WAITING:
                            entry.state = State.LOADING
                        self.monitor.note_usage(self.usage())
                        return
                    case Admit(evict=victims, reasons=reasons, sleep=sleepers):
                        # each eviction awaits: a victim leased meanwhile is no victim any more,
                        # so stop and plan again rather than unload it from under its holder
                        for sleeper in sleepers:
                            target = self._table.get(sleeper)
                            if target is not None and not target.resident().can_park():
                                break
                            if target is not None:
                                await self._park_entry(
                                    target,
                                    reason=f"evicted: {reasons.get(sleeper, '')}",
                                    evicted_for=entry.name,
                                )
                        for victim in victims:
                            target = self._table.get(victim)
                            if target is None:
                                continue
                            if not target.resident().is_evictable():
                                break
                            try:
                                await self._unload_entry(
                                    target,
                                    reason=f"evicted: {reasons.get(victim, '')}",
                                    evicted_for=entry.name,
                                )
                            except UnloadFailed as exc:
                                raise InsufficientMemory(
                                    f"cannot make room for {entry.name!r}: evicting {victim!r} failed ({exc})",
                                    model=entry.name,
                                    would_evict=victims,
                                ) from exc
                    case Wait(blockers=blockers, reason=reason):
                        if blockers != last_blockers:
                            self.events.emit(ev.Waiting(model=entry.name, blockers=blockers, reason=reason))
                            last_blockers = blockers
                        remaining = deadline - self._clock()
                        if remaining <= 0:
                            raise ModelMoraTimeout(
                                f"timed out after {format_duration(self.config.wait_timeout)} waiting for "
                                f"memory to load {entry.name!r}: {reason} (held by "
                                f"{', '.join(self._describe_holders(blockers))})",
                                model=entry.name,
                            )
                        assert self._changed is not None
                        changed = self._changed
                        self._waiting += 1
                        try:
                            with anyio.move_on_after(remaining):
                                await changed.wait()
                        finally:
                            self._waiting -= 1
                    case Refuse():
                        raise self._refusal(entry, plan)

    def _describe_holders(self, names: tuple[str, ...]) -> list[str]:
        out = []
        for name in names:
            e = self._table.get(name)
            if e is not None:
                out.append(
                    f"{name}: {e.state.value}, {e.leases} lease(s), {format_size(sum(e.memory.values()))}"
                )
        return out or ["nothing known"]

    def _refusal(self, entry: Entry, plan: Refuse) -> InsufficientMemory:
        holders = {
            e.name: sum(e.memory.values())
            for e in self._table.values()
            if e is not entry and e.state.holds_memory
        }
        held = ", ".join(f"{n} {format_size(b)}" for n, b in holders.items()) or "nothing"
        return InsufficientMemory(
            f"{plan.reason} (resident: {held})",
            model=entry.name,
            provider=entry.provider,
            device=plan.device,
            needed=plan.needed,
            available=plan.available,
            holders=holders,
        )

    async def _rebalance(self, entry: Entry) -> None:
        """A load measured more than its estimate: evict idle models until back in budget."""
        if not any(entry.memory.get(d, 0) > entry.spec.memory.get(d, 0) for d in entry.memory):
            return
        assert self._admission is not None
        async with self._admission:
            if self._table.get(entry.name) is not entry:
                return
            plan = self._plan_for(entry, entry.memory)
            if isinstance(plan, Admit):
                for victim in plan.evict:
                    target = self._table.get(victim)
                    if target is not None and target.is_evictable():
                        with contextlib.suppress(UnloadFailed):
                            await self._unload_entry(
                                target,
                                reason="evicted: measured size over estimate",
                                evicted_for=entry.name,
                            )
            else:
                log.warning(
                    "%s measured %s, more than its estimate; the budget is exceeded until something is released",
                    entry.name,
                    format_size(sum(entry.memory.values())),
                )

    # -- unloading ----------------------------------------------------------------------

    async def _unload_entry(
        self, entry: Entry, *, reason: str, force: bool = False, evicted_for: str | None = None
    ) -> dict[str, int]:
        if entry.state is State.PARKING:
            await entry.settled.wait()
        if entry.state is State.UNLOADING:
            await entry.gone.wait()
            return {}
        previous = entry.state
        entry.state = State.UNLOADING
        entry.forced = force and entry.leases > 0
        if evicted_for is not None:
            self.events.emit(ev.Evicted(model=entry.name, for_model=evicted_for, reason=reason))
        self.events.emit(ev.Unloading(model=entry.name, reason=reason, forced=entry.forced))
        started = self._clock()
        freed: dict[str, int] = {}
        try:
            with anyio.CancelScope(shield=True):
                if entry.handle is not None:
                    provider = self.provider(entry.provider)
                    with anyio.fail_after(self.config.unload_timeout):
                        freed = await provider.unload(entry.handle)
        except Exception as exc:
            entry.state = previous
            self._notify()
            if isinstance(exc, TimeoutError):
                raise UnloadFailed(
                    f"unloading {entry.name!r} took longer than {format_duration(self.config.unload_timeout)}",
                    model=entry.name,
                    provider=entry.provider,
                ) from None
            if isinstance(exc, UnloadFailed):
                raise
            raise UnloadFailed(
                f"unloading {entry.name!r} failed: {exc}", model=entry.name, provider=entry.provider
            ) from exc
        if entry.handle is not None:
            entry.handle.close()
        self._remove(entry)
        self.events.emit(
            ev.Unloaded(
                model=entry.name,
                reason=reason,
                duration_s=self._clock() - started,
                freed=freed or dict(entry.memory),
                forced=entry.forced,
            )
        )
        return freed

    async def _unload_idle(self, entry: Entry) -> None:
        if self._table.get(entry.name) is not entry or not entry.idle_expired(
            self._clock(), self.config.idle_ttl
        ):
            return
        try:
            if entry.can_sleep and can_park_within(
                entry.resident(),
                [e.resident() for e in self._table.values()],
                self._budgets,
                self._external(),
            ):
                await self._park_entry(entry, reason="idle")
            else:
                await self._unload_entry(entry, reason="idle")
        except UnloadFailed as exc:
            log.warning("idle unload failed: %s", exc)

    async def _park_entry(self, entry: Entry, *, reason: str, evicted_for: str | None = None) -> None:
        """Move a ready model to its warm tier; if the runtime cannot, unload it instead."""
        if entry.state is not State.READY or entry.handle is None:
            return
        entry.state = State.PARKING
        entry.settled = anyio.Event()
        started = self._clock()
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(self.config.unload_timeout):
                level = int(entry.spec.options.get("sleep_level", 1))
                held = await self.provider(entry.provider).sleep(entry.handle, level)
        except Exception as exc:
            entry.state = State.READY
            entry.settled.set()
            log.warning("parking %s failed (%s); unloading it instead", entry.name, exc)
            await self._unload_entry(entry, reason=f"{reason}; warm tier failed", evicted_for=evicted_for)
            return
        entry.sleep_memory = dict(held) if held else entry.parked_memory()
        entry.memory = dict(entry.sleep_memory)
        entry.state = State.SLEEPING
        entry.settled.set()
        self.events.emit(
            ev.Slept(
                model=entry.name, reason=reason, duration_s=self._clock() - started, memory=dict(entry.memory)
            )
        )
        self._notify()

    async def _discard(self, entry: Entry) -> None:
        """Best-effort unload of a model whose state is unknown after a failure."""
        if entry.handle is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.unload_timeout):
            try:
                await self.provider(entry.provider).unload(entry.handle)
            except Exception as exc:
                log.warning("cleaning up %s after a failure also failed: %s", entry.name, exc)
        entry.handle.close()

    def _remove(self, entry: Entry) -> None:
        if self._table.get(entry.name) is entry:
            del self._table[entry.name]
        entry.gone.set()
        self._notify()

    # -- background work ----------------------------------------------------------------

    async def _reaper(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        next_reconcile = self._clock() + self.config.reconcile_interval
        while True:
            await anyio.sleep(self.config.reaper_interval)
            now = self._clock()
            for entry in list(self._table.values()):
                if entry.idle_expired(now, self.config.idle_ttl):
                    await self._unload_idle(entry)
            if now >= next_reconcile:
                next_reconcile = now + self.config.reconcile_interval
                await self.reconcile()
                await self._refresh()

    async def _refresh(self) -> None:
        now = self._clock()
        for entry in list(self._table.values()):
            provider = self._providers.get(entry.provider)
            if (
                provider is None
                or not provider.capabilities.refresh
                or entry.handle is None
                or not entry.owned
                or entry.state is not State.READY
            ):
                continue
            expires = entry.expires_in(now, self.config.idle_ttl)
            try:
                await provider.refresh(entry.handle, math.inf if expires is None else expires)
            except ModelMoraError as exc:
                log.warning("refreshing %s failed: %s", entry.name, exc)

    async def reconcile(self) -> None:
        """Bring the table in line with what the runtimes report: drop models that vanished,
        adopt models that are resident but unknown, take measured sizes."""
        for name, provider in list(self._providers.items()):
            started = self._clock()
            try:
                observed = await provider.observe()
            except ModelMoraError as exc:
                log.warning("cannot observe provider %s: %s", name, exc)
                continue
            by_target = {o.target: o for o in observed}
            mine = [e for e in self._table.values() if e.provider == name]
            for entry in mine:
                if entry.state not in (State.READY, State.SLEEPING) or (entry.loaded_at or 0) >= started:
                    continue
                seen = by_target.get(entry.spec.target)
                if seen is None:
                    self._vanish(entry)
                    continue
                if seen.memory:
                    entry.memory = dict(seen.memory)
                if seen.tier is Tier.SLEEPING and entry.state is State.READY and not entry.leases:
                    entry.state, entry.sleep_memory = State.SLEEPING, dict(entry.memory)
                elif seen.tier is Tier.ACTIVE and entry.state is State.SLEEPING:
                    entry.state = State.READY
                    entry.active_memory = dict(entry.memory)
            known = {e.spec.target for e in mine}
            for target, seen in by_target.items():
                if target in known:
                    continue
                spec = self._spec_for_target(name, target, seen.memory)
                if spec.name in self._table:
                    continue
                handle = await provider.adopt(seen, spec)
                asleep = seen.tier is Tier.SLEEPING
                entry = Entry(spec, name, state=State.SLEEPING if asleep else State.READY)
                entry.handle = handle
                entry.can_sleep = provider.capabilities.warm_tier and (spec.warm_tier or asleep)
                entry.memory = dict(seen.memory) or dict(spec.memory)
                if asleep:
                    entry.sleep_memory = dict(entry.memory)
                else:
                    entry.active_memory = dict(entry.memory)
                entry.owned = seen.owned
                entry.loaded_at = self._clock()
                self._table[spec.name] = entry
                self.events.emit(
                    ev.Adopted(model=spec.name, provider=name, memory=dict(entry.memory), owned=seen.owned)
                )
        self.monitor.note_usage(self.usage())

    def _spec_for_target(self, provider: str, target: str, memory: Mapping[str, int]) -> ModelSpec:
        for spec in self._specs.values():
            if spec.provider == provider and spec.target == target:
                return spec
        spec = ModelSpec(name=f"{provider}/{target}", provider=provider, target=target, memory=dict(memory))
        self._specs[spec.name] = spec
        return spec

    def _vanish(self, entry: Entry) -> None:
        if entry.handle is not None:
            entry.handle.close()
        self._remove(entry)
        self.events.emit(ev.Vanished(model=entry.name, provider=entry.provider, leased=entry.leases))

    def __repr__(self) -> str:
        rows = ", ".join(
            f"{e.name}({e.state.value}{f', {e.leases} leases' if e.leases else ''})"
            for e in self._table.values()
        )
        used = self.usage()
        mem = ", ".join(
            f"{d} {format_size(used.get(d, 0))}/{format_size(b)}" for d, b in self._budgets.items()
        )
        state = "running" if self._tg is not None else "stopped"
        return f"<ModelManager {state} [{len(self._table)} resident: {rows or '-'} | {mem or 'no budgets'}]>"


__all__ = ["Lease", "ManagerStatus", "ModelManager", "ModelStatus", "UnloadAllResult"]
