"""ModelManager: the facade that composes the core.

    async with ModelManager(config) as mm:
        async with mm.use("qwen-14b") as model:   # lease: load on first use, shared
            ...                                     # never evicted while leased

Its two promises: **a budget is never overcommitted** (admission reserves before a load
or wake starts, against a fresh reading — :mod:`~modelmora.core.admission`) and **a
leased model is never unloaded unless forced** (every unload re-checks leases with no
``await`` between the check and the transition — :mod:`~modelmora.core.transitions`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc

from .. import events as ev
from ..config import ManagerConfig
from ..errors import ConfigError, ModelInUse, UnloadFailed
from ..footprint import Footprint, total
from ..hardware import Hardware, hardware_view
from ..hooks import HookCallable, check_hooks
from ..memory import MemoryMonitor, MemoryProbe, ResolvedBudget, check_devices_present, resolve_budget_details
from ..providers import ProviderRegistry
from ..providers import registry as default_registry
from ..providers.base import Handle, Provider
from ..spec import ModelSpec, format_size
from .admission import Admission
from .baseline import Baseline, preload
from .context import Core
from .leases import Lease, Leases
from .lifecycle import STABLE, Entry, State
from .loading import Loader
from .planner import Admit, Plan, can_park_within
from .prefetch import Prefetch
from .reaper import Reaper
from .reconcile import Reconciler
from .scheduling import Scheduler
from .status import ManagerStatus, UnloadAllResult, manager_status
from .table import EntryView, resident
from .transitions import Transitions
from .watchdog import Watchdog

log = logging.getLogger("modelmora")


class ModelManager:
    """Keeps the right models resident.  Use as ``async with ModelManager(config) as mm``.

    ``providers`` injects ready provider instances by name (tests, custom runtimes);
    others are built from ``config.providers`` through the provider ``registry``.
    ``probe`` reads device memory (NVML/torch/psutil by default).  ``hooks``: Python
    lifecycle hooks by event (``{"before_load": fn}``, sync or async ``fn(HookContext)``),
    run after the configured commands (:mod:`modelmora.hooks`); an unknown event is a
    ConfigError.
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
        hooks: Mapping[str, HookCallable | Sequence[HookCallable]] | None = None,
    ):
        if config is None:
            config = ManagerConfig()
        elif isinstance(config, str | os.PathLike):
            config = ManagerConfig.from_yaml(config)
        elif not isinstance(config, ManagerConfig):
            config = ManagerConfig.from_dict(config)
        self.config: ManagerConfig = config
        self.events = ev.EventBus()
        logger = ev.LoggingSubscriber(verbose=config.verbose)  # lease events only at DEBUG
        self.events.subscribe(logger, leases=logger.logger.isEnabledFor(logging.DEBUG))
        self.monitor = MemoryMonitor(probe)
        self.unload_on_exit = unload_on_exit
        self._clock = clock
        self._registry = registry or default_registry
        self._injected = dict(providers or {})
        try:
            self._hooks = check_hooks(hooks)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._core = Core(config, self.events, self.monitor, clock)
        self._tg: anyio.abc.TaskGroup | None = None
        self._budget_details: dict[str, ResolvedBudget] = {}

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise RuntimeError("this ModelManager is already running")
        core = self._core = Core(self.config, self.events, self.monitor, self._clock)
        core.hooks.callables = self._hooks
        core.build_providers(self._registry, self._injected)
        scheduler = Scheduler(core)
        admission = Admission(core, scheduler)
        transitions = self._transitions = Transitions(core)
        loader = Loader(core, admission, transitions)
        self._reconciler = Reconciler(core, transitions)
        loader.reconcile = self._reconciler.run
        self._leases = Leases(core, loader, scheduler)
        self._reaper = Reaper(core, transitions, self._reconciler)
        self._leases.on_idle = self._reaper.schedule_idle
        self._watchdog = Watchdog(core, transitions)
        self._admission = admission
        for provider in core.providers.values():
            provider.bind(transitions.lost)
        try:
            await core.refresh_readings()
            check_devices_present(self.config.devices, core.readings)
            self._budget_details = resolve_budget_details(
                self.config.budgets, self.config.reserve, core.readings, self.config.devices
            )
            for provider in core.providers.values():  # devices a runtime brings (a Ray cluster's nodes)
                for device, budget in (await provider.devices()).items():
                    self._budget_details.setdefault(device, ResolvedBudget(device, budget, 0, "runtime"))
            core.budgets = {d: r.budget for d, r in self._budget_details.items()}
        except BaseException:
            await self._close_providers()
            raise
        # the task group lives from here to the end of __aexit__; everything in the
        # background is started through Core.spawn and ends before the providers close
        tg = self._tg = anyio.create_task_group()
        await tg.__aenter__()
        core.tg, core.running = tg, True
        try:
            await self._reconciler.run(wait_for_adoptions=True)
            await tg.start(self._reaper.run)
            if self.config.watchdog.enabled:
                core.spawn(self._watchdog.run, name="modelmora-watchdog", service=True)
            if self.config.on_startup:
                names = self.config.on_startup
                core.spawn(lambda: preload(self._leases, names), name="modelmora-on-startup")
            if self.config.prefetch.enabled:
                prefetch = Prefetch(core, self._leases, self.config.prefetch)
                core.on_request = prefetch.on_request
                core.spawn(prefetch.run, name="modelmora-prefetch", service=True)
            if self.config.baseline is not None:
                baseline = Baseline(core, self._leases, admission, self.config.baseline)
                self.events.subscribe(baseline.on_event, leases=False)
                core.spawn(baseline.run, name="modelmora-baseline", service=True)
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # the body's own exception is not handed to the task group, so callers see
        # UnknownModel & co. themselves rather than wrapped in an ExceptionGroup
        await self._shutdown()

    async def _shutdown(self) -> None:
        """Structured shutdown, in order: accept no new work and answer every waiting caller
        (ManagerClosed); cancel in-flight loads, wakes and adoptions and wait for their
        clean-up; ``unload_on_exit``: unload everything; end the background services and
        the task group; only then close the providers.  Never raises an error of its own:
        what fails is logged."""
        core, tg = self._core, self._tg
        if tg is None:
            return
        # shielded, each part bounded (unload_timeout): a caller cancelled while leaving
        # still gets a clean exit; the task group itself is left outside any other scope
        with anyio.CancelScope(shield=True):
            try:
                await core.wind_down()
                if self.unload_on_exit:
                    await self._unload_all(force=True, shutdown=True)
            except Exception:
                log.exception("shutting the ModelManager down")
        tg.cancel_scope.cancel()
        cancelled: BaseException | None = None
        try:
            await tg.__aexit__(None, None, None)
        except anyio.get_cancelled_exc_class() as exc:  # the caller's own cancellation: goes on
            cancelled = exc
        except BaseException as exc:  # nothing of ours may escape (Core.spawn guards work)
            log.error("the ModelManager's background work ended with %r", exc)
        finally:
            self._tg = core.tg = None
            with anyio.CancelScope(shield=True):
                await self._close_providers()
        if cancelled is not None:
            raise cancelled

    async def _close_providers(self) -> None:
        core = self._core
        for name, provider in core.providers.items():
            provider.bind(None)
            if name not in self._injected:
                try:
                    await provider.aclose()
                except Exception as exc:
                    log.warning("closing provider %s failed: %s", name, exc)
        self.monitor.close()

    def provider(self, name: str) -> Provider:
        """The provider instance called ``name``."""
        return self._core.provider(name)

    @property
    def providers(self) -> Mapping[str, Provider]:
        return dict(self._core.providers)

    def spec(self, name: str | None = None) -> ModelSpec:
        """The spec for ``name`` (default model when None); ``provider/target`` names a model
        inline, e.g. ``ollama/mistral-small:22b``.  Raises UnknownModel / ConfigError."""
        return self._core.spec(name)

    @property
    def models(self) -> Mapping[str, ModelSpec]:
        return dict(self._core.specs)

    # -- leases and manual control ---------------------------------------------------------

    def use(
        self,
        name: str | None = None,
        *,
        timeout: float | None = None,
        keep_alive: float | None = None,
        priority: int | None = None,
        key: str | None = None,
        weight: float = 1.0,
    ) -> Lease:
        """A lease on ``name``: loads it on first use, shares it, never evicts it while held.
        ``timeout`` (seconds) bounds the wait for memory and the load (ModelMoraTimeout);
        ``keep_alive`` (seconds) overrides how long the model stays once idle.  While it
        waits, the caller ranks by ``priority`` (higher first; default: the model's
        ``priority``), and among callers of one level by weighted fair shares between
        ``key`` s (an API key, a tenant) with ``weight`` (see ``config.scheduling``);
        :class:`Overloaded` when the model's line is full or the wait would pass
        ``scheduling.max_wait``."""
        return Lease(
            self._leases_or_closed(),
            name if name is not None else self.spec().name,
            timeout,
            keep_alive,
            priority=priority,
            key=key,
            weight=weight,
        )

    def _leases_or_closed(self) -> Leases:
        self._core.check_open()  # ManagerClosed outside `async with`, or shutting down
        return self._leases

    async def load(
        self,
        name: str | None = None,
        *,
        pin: bool = False,
        keep_alive: float | None = None,
        retry: bool = False,
        timeout: float | None = None,
        background: bool = False,
    ) -> Handle:
        """Make ``name`` resident without holding a lease (it stays for its keep-alive, or
        until evicted; ``pin=True`` keeps it until unpinned or force-unloaded).
        ``retry=True`` skips the cool-down after a recent failure (RecentlyFailed).
        ``background=True``: a low-priority load that goes ahead only into free memory
        while nothing else loads or waits, and otherwise raises :class:`LoadDeferred`
        (it never evicts or parks anything; the ``baseline`` model is loaded so)."""
        spec = self.spec(name)
        leases = self._leases_or_closed()
        entry, _ = await leases.acquire(
            spec.name, timeout=timeout, keep_alive=keep_alive, pin=pin, retry=retry, background=background
        )
        handle = entry.handle
        leases.release(entry)
        assert handle is not None
        return handle

    async def unload(self, name: str, *, force: bool = False) -> bool:
        """Unload ``name``; False when it was not resident.  A leased model — held, or a
        caller waiting for it in any state — raises :class:`ModelInUse` unless ``force``,
        which closes the holders' handles.  Leases are checked again after every wait, so
        a lease taken meanwhile is never broken."""
        self._core.check_open()
        return await self._unload(name, force=force)

    async def _unload(self, name: str, *, force: bool, shutdown: bool = False) -> bool:
        """``shutdown``: the shutdown's own unload (``unload_on_exit``); any other call
        starts no unload once shutdown has begun (ManagerClosed)."""
        core = self._core
        if not shutdown:
            core.check_open()
        entry = core.table.get(name)
        if entry is None:
            self.spec(name)  # unknown names still get a clear error
            return False
        while True:
            if entry.leases and not force:
                raise ModelInUse(name, entry.leases)
            if entry.state in STABLE:
                break
            if entry.state is State.GONE or core.table.get(name) is not entry:
                return False
            if shutdown:
                await entry.changed()  # in-flight work has ended: this is never a long wait
            else:
                with core.waiting():
                    await entry.changed()
        if not shutdown:
            core.check_open()  # shutdown began while this call waited: no new unload
        reason = "forced" if force and entry.leases else "manual"
        await self._transitions.unload(entry, reason=reason, force=force)
        return True

    async def unload_all(self, *, force: bool = False) -> UnloadAllResult:
        """Unload every resident model; without ``force`` leased and pinned ones stay.  Every
        model is attempted: the failures are listed in ``failed``, not raised."""
        self._core.check_open()
        return await self._unload_all(force=force)

    async def _unload_all(self, *, force: bool, shutdown: bool = False) -> UnloadAllResult:
        result = UnloadAllResult([], [], [], {})
        for entry in self._core.table:
            if not force and entry.pinned:
                result.pinned.append(entry.name)
                continue
            try:
                if await self._unload(entry.name, force=force, shutdown=shutdown):
                    result.unloaded.append(entry.name)
            except ModelInUse:
                result.in_use.append(entry.name)
            except UnloadFailed as exc:
                result.failed[entry.name] = str(exc)
        return result

    async def park(self, name: str) -> bool:
        """Move a resident, unleased model to its warm tier now; False when it cannot park
        (no warm tier, leased, not ready, or its warm copy would not fit the RAM budget).
        The next use wakes it."""
        self._core.check_open()
        entry = self._core.table.get(name)
        provider = self._core.providers.get(entry.provider) if entry is not None else None
        if entry is None or provider is None or not provider.capabilities.warm_tier:
            return False
        if entry.state is not State.READY or entry.leases:
            return False
        warm = replace(resident(entry), sleep_memory=entry.warm)
        core = self._core
        if not can_park_within(warm, core.table.residents(exclude=entry), core.budgets, core.external()):
            return False  # its warm copy would not fit the RAM budget
        await self._transitions.park(entry, reason="manual")
        return self.is_parked(name)

    def is_parked(self, name: str) -> bool:
        entry = self._core.table.get(name)
        return entry is not None and entry.state is State.SLEEPING

    def unpin(self, name: str) -> None:
        entry = self._core.table.get(name)
        if entry is not None:
            entry.pinned = False
            self._core.notify()

    async def reconcile(self) -> None:
        """Bring the table in line with what the runtimes report now (never raises; a
        provider that cannot answer is listed in ``status().problems``)."""
        await self._reconciler.run()

    # -- questions ------------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        """Names of resident models (ready or in a warm tier)."""
        return [e.name for e in self._core.table if e.state in STABLE]

    def is_loaded(self, name: str) -> bool:
        entry = self._core.table.get(name)
        return entry is not None and entry.state in STABLE

    def leases(self, name: str) -> int:
        entry = self._core.table.get(name)
        return entry.leases if entry else 0

    def entries(self) -> list[EntryView]:
        """Read-only copies of the table's rows (status pages, metrics, tests)."""
        return self._core.table.views()

    @property
    def budgets(self) -> dict[str, int]:
        return dict(self._core.budgets)

    def usage(self) -> dict[str, int]:
        """Bytes per device the table is counted for (reservations included)."""
        return self._core.usage().as_dict()

    def plan(self, name: str, memory: Mapping[str, int] | None = None) -> Plan:
        """What admitting ``name`` now would do, without doing it: the same decision the
        admission takes (``memory``: a better estimate than the registry's)."""
        entry = self._probe_entry(name)
        candidate = self._admission.candidate(entry, memory.items() if memory is not None else None)
        return self._admission.decide(entry, candidate)

    def _probe_entry(self, name: str) -> Entry:
        core = self._core
        current = core.table.get(name)
        if current is not None:
            return current
        return core.new_entry(core.spec(name))

    def footprint(self, name: str) -> tuple[dict[str, int], float | None]:
        """Bytes per device and load seconds for ``name``: measured when this manager has
        loaded it, else the spec's estimates (what planners ahead of time need)."""
        spec = self.spec(name)
        entry = self._core.table.get(name)
        measured, seconds = self._core.history.get(name, (Footprint(spec.memory), spec.load_time))
        if entry is not None and entry.state is State.READY:
            return entry.active.as_dict(), seconds
        return measured.as_dict(), seconds

    def headroom(self, exclude: Iterable[str] = ()) -> dict[str, int]:
        """Budget per device left once memory that cannot be reclaimed is counted: other
        processes, and models not in ``exclude`` that are leased, pinned or in transition."""
        skip = set(exclude)
        held = total(e.held() for e in self._core.table if e.name not in skip and not e.is_evictable())
        external = self._core.external()
        return {d: max(0, budget - held.on(d) - external.on(d)) for d, budget in self._core.budgets.items()}

    def can_fit(self, name: str) -> bool:
        """True when ``name`` fits now without evicting anything."""
        plan = self.plan(name)
        return isinstance(plan, Admit) and not plan.evict and not plan.sleep

    def problems(self) -> dict[str, str]:
        """Background work that failed its last run (component → error); empty when healthy."""
        return dict(self._core.problems)

    def outages(self) -> dict[str, dict[str, Any]]:
        """Providers whose runtime is known to be unreachable: per provider ``since`` (the
        manager's clock), ``down_s`` (seconds since), ``retry_in_s`` (seconds until its
        models are tried again), ``count`` (failed tries in a row) and ``error``."""
        now = self._core.clock()
        return {
            name: {
                "since": o.since,
                "down_s": now - o.since,
                "retry_in_s": max(0.0, o.until - now),
                "count": o.count,
                "error": str(o.error),
            }
            for name, o in sorted(self._core.outages.items())
        }

    async def status(self) -> ManagerStatus:
        await self._core.refresh_readings()
        return manager_status(self._core)

    async def hardware(self) -> Hardware:
        """The devices from a fresh reading: per device its total, what other processes
        hold, what modelmora's rows hold, the reserve, the budget and its source, and what
        a load may still take (bytes; see :class:`~modelmora.hardware.DeviceHardware`)."""
        core = self._core
        await core.refresh_readings()
        others = core.others()
        return hardware_view(
            core.readings,
            self._budget_details,
            core.usage().as_dict(),
            others,
            core.external().as_dict(),
            self.config.devices,
        )

    def __repr__(self) -> str:
        core = self._core
        rows = ", ".join(
            f"{e.name}({e.state.value}{f', {e.leases} leases' if e.leases else ''})" for e in core.table
        )
        used = core.usage()
        mem = ", ".join(f"{d} {format_size(used.on(d))}/{format_size(b)}" for d, b in core.budgets.items())
        state = "running" if core.running else "stopped"
        return f"<ModelManager {state} [{len(core.table)} resident: {rows or '-'} | {mem or 'no budgets'}]>"


__all__ = ["ModelManager"]
