"""What the core's parts share: the table, the lifecycle, providers, budgets and readings.

:class:`Core` holds state and answers small questions about it; the behaviour lives in
the modules named after it (admission, transitions, leases, reaper, reconcile).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, replace

import anyio
import anyio.abc

from .. import events as ev
from ..config import ManagerConfig
from ..errors import (
    ConfigError,
    ManagerClosed,
    ModelMoraError,
    ProviderUnavailable,
    RuntimeUnreachable,
    UnknownModel,
)
from ..footprint import EMPTY, Footprint, total
from ..hooks import HookRunner
from ..memory import DeviceMemory, MemoryMonitor
from ..providers import ProviderRegistry
from ..providers.base import Provider
from ..spec import ModelSpec, format_size
from .lifecycle import STABLE, Entry, Lifecycle, State
from .planner import Resident
from .policy import LOAD_SAMPLES, Cost, Measured, Reuse, Room, Successors, load_estimate, load_samples
from .table import Table

log = logging.getLogger("modelmora")


@dataclass
class Failure:
    """A model's failed loads: how many in a row, and until when it cools down."""

    count: int
    at: float
    until: float
    error: BaseException


@dataclass
class Outage:
    """A provider whose runtime could not be reached: since when, how many times in a row
    (each after the last cool-down ended), until when its models are refused at once, and
    the last error."""

    since: float
    count: int
    until: float
    error: BaseException


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the runtime every model of its provider shares could not be
    reached (:class:`~modelmora.errors.RuntimeUnreachable`), rather than that one model,
    or a model's own server, failed: only that starts an outage.  A busy runtime, a
    timeout or a connection error a provider let through unmapped is not one: the model
    failed, and its provider's other models may be fine."""
    return isinstance(exc, RuntimeUnreachable)


class Core:
    """The manager's shared state (one per running :class:`ModelManager`)."""

    def __init__(
        self,
        config: ManagerConfig,
        bus: ev.EventBus,
        monitor: MemoryMonitor,
        clock: Callable[[], float],
    ):
        self.config = config
        self.bus = bus
        self.monitor = monitor
        self.clock = clock
        self.table = Table()
        self.lifecycle = Lifecycle(bus, self.notify)
        self.specs: dict[str, ModelSpec] = dict(config.models)
        self.providers: dict[str, Provider] = {}
        self.provider_errors: dict[str, ModelMoraError] = {}
        self.budgets: dict[str, int] = {}
        self._room = Room(self.budgets)  # the shadow caches' room, rebuilt when it changes
        self.readings: list[DeviceMemory] = []
        self.ours_at_reading: Footprint = EMPTY  # what our rows held when ``readings`` were taken
        self.leaked_at_reading: Footprint = EMPTY  # what providers reported leaked right after
        self.history: dict[str, tuple[Footprint, float]] = {}  # last load: measured, seconds
        self.load_times: dict[str, deque[float]] = {}  # the last LOAD_SAMPLES loads' seconds
        self.raised: dict[str, Footprint] = {}  # estimates an out-of-memory load raised, until measured
        self.failures: dict[str, Failure] = {}
        self.outages: dict[str, Outage] = {}  # provider → its runtime's outage, until it answers
        self.reuse = Reuse()  # gaps between each model's requests: the eviction policy's history
        self.successors = Successors()  # which model followed which: the prefetch's history
        self.on_request: Callable[[str], None] = lambda name: None  # the prefetch, when enabled
        self.problems: dict[str, str] = {}
        self.tg: anyio.abc.TaskGroup | None = None
        self.running = False  # from the start of the task group until shutdown begins
        self.closing = False  # shutdown has begun: no new work, every waiter is answered
        self._work: set[anyio.CancelScope] = set()  # loads, wakes, adoptions, idle unloads
        self._work_done = anyio.Event()
        self._work_done.set()
        self._waits: set[anyio.CancelScope] = set()  # callers waiting for a model
        self._transitions = 0  # unloads and parks under way (callers' and evictions')
        self._transitions_done = anyio.Event()
        self._transitions_done.set()
        self._changed = anyio.Event()
        self._waiting = 0
        self.hooks = HookRunner(  # the manager adds the Python hooks it was given
            global_hooks=config.hooks,
            timeout=config.hook_timeout,
            bus=bus,
            spawn=lambda fn, name: self.spawn(fn, name=name),
        )

    # -- providers and specs --------------------------------------------------------------

    def build_providers(self, registry: ProviderRegistry, injected: Mapping[str, Provider]) -> None:
        """Fresh provider instances for every run (a closed client is never reused);
        ``injected`` ones are used as given.  A provider whose runtime is unavailable is
        remembered and raised when one of its models is used."""
        self.providers.update(injected)
        wanted = set(self.config.providers) | {s.provider for s in self.specs.values()}
        for name in sorted(wanted - set(self.providers)):
            settings = dict(self.config.providers.get(name, {}))
            type_name = str(settings.pop("type", name))
            try:
                self.providers[name] = registry.create(type_name, name, settings)
            except ProviderUnavailable as exc:
                self.provider_errors[name] = exc
            except ConfigError as exc:
                users = sorted(s.name for s in self.specs.values() if s.provider == name)
                where = f"models.{users[0]}.provider" if users else f"providers.{name}"
                raise ConfigError(f"{where}: {exc}") from None

    def provider(self, name: str) -> Provider:
        if name in self.providers:
            return self.providers[name]
        if name in self.provider_errors:
            raise self.provider_errors[name]
        raise ConfigError(f"no provider named {name!r} (configured: {', '.join(sorted(self.providers))})")

    def provider_down(self, name: str, exc: BaseException) -> Outage:
        """``name``'s runtime could not be reached: start its outage, or, once the last
        cool-down has ended, count one more and double the next (``outage_cooldown`` up to
        ``outage_cooldown_max``).  Failures during a cool-down only update its error."""
        now, config = self.clock(), self.config
        outage = self.outages.get(name)
        if outage is not None and now < outage.until:
            outage.error = exc
            return outage
        count = outage.count + 1 if outage is not None else 1
        cooldown = min(config.outage_cooldown * 2.0 ** (count - 1), config.outage_cooldown_max)
        since = outage.since if outage is not None else now
        self.outages[name] = outage = Outage(since, count, now + cooldown, exc)
        if count == 1:
            log.warning("provider %s is unreachable: %s", name, exc)
        return outage

    def provider_up(self, name: str) -> None:
        """``name``'s runtime answered: its outage, if any, is over."""
        if self.outages.pop(name, None) is not None:
            log.info("provider %s answers again", name)

    def spec(self, name: str | None) -> ModelSpec:
        """The spec for ``name`` (the default model when None); ``provider/target`` names a
        model inline, e.g. ``ollama/mistral-small:22b``."""
        if name is None:
            if self.config.default_model is None:
                raise ConfigError("no model named and no default_model configured")
            name = self.config.default_model
        spec = self.specs.get(name)
        if spec is not None:
            return spec
        prefix, sep, target = name.partition("/")
        if sep and target and (prefix in self.providers or prefix in self.provider_errors):
            # on the first device the config lets modelmora use (``devices``), else cuda:0
            allowed = self.config.devices
            device = "cuda:0" if allowed is None else (allowed[0] if allowed else "cpu")
            spec = ModelSpec(name=name, provider=prefix, target=target, device=device)
            self.specs[name] = spec
            return spec
        raise UnknownModel(name, self.config.models)

    def new_entry(
        self,
        spec: ModelSpec,
        state: State = State.QUEUED,
        *,
        estimate: Footprint | None = None,
        measured: Footprint | None = None,
    ) -> Entry:
        """A row for ``spec``, not yet in the table, that remembers the last measurement
        (a reload reserves what the model really took, not only its estimate)."""
        if measured is None and spec.name in self.history:
            measured = self.history[spec.name][0]
        entry = Entry(
            spec, self.key(spec), now=self.clock(), state=state, estimate=estimate, measured=measured
        )
        provider = self.providers.get(spec.provider)
        entry.can_park = spec.warm_tier and provider is not None and provider.capabilities.warm_tier
        return entry

    def measured(self, name: str, footprint: Footprint, seconds: float) -> None:
        """A load of ``name`` took ``seconds`` and holds ``footprint``: the last
        measurement, and one more sample of its load time."""
        self.history[name] = (footprint, seconds)
        samples = self.load_times.get(name)
        if samples is None:
            samples = self.load_times[name] = deque(maxlen=LOAD_SAMPLES)
        samples.append(seconds)

    def reload_seconds(self, name: str) -> float:
        """What loading ``name`` again would take (seconds): the median of its measured
        loads here, pooled with those of equal-size models on its provider
        (:func:`~modelmora.core.policy.load_samples`), else its spec's ``load_time``, else
        1 s; at least 1 ms.  What losing it costs, per byte, for placement's evictions and
        the watchdog's order."""
        return self._reload(name)[0]

    def _reload(self, name: str) -> tuple[float, tuple[float, float] | None]:
        """:meth:`reload_seconds` and the fastest and slowest of ``name``'s own measured loads."""
        samples = load_samples(name, self._measured()) if name in self.load_times else []
        if samples:  # the pool's median, the bounds of its own loads
            return max(load_estimate(samples)[0], 1e-3), load_estimate(self.load_times[name])[1]
        entry = self.table.get(name)
        spec_s = entry.spec.load_time if entry is not None else None
        return max(spec_s if spec_s is not None else 1.0, 1e-3), None

    def _measured(self) -> dict[str, Measured]:
        return {
            n: Measured(self.specs[n].provider, sum(self.history[n][0].values()), samples)
            for n, samples in self.load_times.items()
            if n in self.specs and n in self.history
        }

    def snapshot(self, exclude: Entry | None = None, deciding: str | None = None) -> list[Resident]:
        """The planner's view of the table (:meth:`Table.residents`) with what the eviction
        policy needs of each model: its reload seconds (and their bounds) and when it is
        expected next."""
        out = []
        kind = self.reuse.estimate  # the set duel's choice, once for the whole view
        for r in self.table.residents(exclude=exclude, deciding=deciding):
            seconds, bounds = self._reload(r.name)
            out.append(
                replace(r, load_s=seconds, load_bounds=bounds, next_use=self.reuse.next_use(r.name, kind))
            )
        return out

    def requested(self, name: str) -> None:
        """A lease on ``name`` was granted to a request (not to a background load): count
        it for the eviction policy and the prefetch."""
        entry = self.table.get(name)
        if entry is not None and self.budgets:  # priced only where a shadow cache misses it
            room = self._room
            if room.budgets is not self.budgets or room.max_loaded != self.config.max_loaded_models:
                room = self._room = Room(self.budgets, self.config.max_loaded_models)
            self.reuse.request(name, lambda: Cost(entry.planned().as_dict(), self.reload_seconds(name)), room)
        else:
            self.reuse.request(name)
        self.successors.request(name)
        self.on_request(name)

    def key(self, spec: ModelSpec) -> str:
        """The runtime's identity of ``spec``'s target (see ``Provider.target_key``)."""
        provider = self.providers.get(spec.provider)
        return provider.target_key(spec.target) if provider is not None else spec.target

    def check_open(self) -> None:
        """Raise :class:`ManagerClosed` unless the manager runs and is not shutting down."""
        if not self.running:
            if self.closing:
                raise ManagerClosed("the ModelManager is shutting down")
            raise ManagerClosed(
                "the ModelManager is not running: use it inside `async with ModelManager(...)`"
            )

    # -- structured background work ------------------------------------------------------------

    def spawn(self, fn: Callable[[], Awaitable[None]], *, name: str, service: bool = False) -> None:
        """Start background work in the manager's task group: the one place it is started.

        Work (loads, wakes, adoptions, idle unloads) is refused once shutdown has begun
        (:class:`ManagerClosed`), and shutdown cancels it and waits for it to finish *while
        the providers are still open*; services (watchers) run until the task group ends.
        An exception from either is reported as a problem and never ends the task group."""
        if self.tg is None or (self.closing and not service):
            raise ManagerClosed("the ModelManager is shutting down: no new work is started")
        scope = anyio.CancelScope()
        if not service:
            self._work.add(scope)
            self._work_done = anyio.Event()
        self.tg.start_soon(self._guarded, fn, scope, name, name=name)

    async def _guarded(self, fn: Callable[[], Awaitable[None]], scope: anyio.CancelScope, name: str) -> None:
        try:
            with scope:
                await fn()
        except Exception as exc:  # a bug or a provider's error: never the task group's end
            log.exception("%s failed", name)
            self.problem(name, exc)
        finally:
            self._work.discard(scope)
            if not self._work:
                self._work_done.set()

    @contextlib.contextmanager
    def transition(self) -> Iterator[None]:
        """An unload or park calls its runtime inside this block: shutdown waits for it
        (each is bounded by ``unload_timeout``) before it closes the providers."""
        self._transitions += 1
        if self._transitions == 1:
            self._transitions_done = anyio.Event()
        try:
            yield
        finally:
            self._transitions -= 1
            if not self._transitions:
                self._transitions_done.set()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A caller waits for a model inside this block; shutdown answers it with
        :class:`ManagerClosed` (its wait is cancelled, never left hanging)."""
        self.check_open()
        scope = anyio.CancelScope()
        self._waits.add(scope)
        try:
            with scope:
                yield
        finally:
            self._waits.discard(scope)
        if scope.cancelled_caught:
            raise ManagerClosed("the ModelManager shut down while this call waited for a model")

    async def wind_down(self) -> None:
        """Shutdown's first half: accept no new work, answer every waiting caller
        (ManagerClosed), cancel in-flight loads, wakes and adoptions, and wait until they
        and the unloads and parks under way have finished (providers still open).  Never
        raises."""
        self.running, self.closing = False, True
        for scope in list(self._waits):
            scope.cancel()
        for scope in list(self._work):
            scope.cancel()
        self.notify()
        with anyio.CancelScope(shield=True):
            await self._work_done.wait()
            await self._transitions_done.wait()

    # -- memory -----------------------------------------------------------------------------

    async def refresh_readings(self) -> None:
        """Read the devices now (in a worker thread), remembering what our settled rows
        held at that moment, so that memory we free afterwards is never taken for someone
        else's.  Rows in transition (loading, waking, parking, unloading) are not
        subtracted: what they physically hold at that instant is unknown, so it counts as
        others' as well as theirs — twice rather than never."""
        settled = {e: e.generation for e in self.table if e.state in STABLE}
        readings = await self.monitor.read()
        self.readings = readings
        # only rows settled for the whole reading: a load finishing meanwhile may be missing
        # from it, and subtracting it would hide what other processes hold
        self.ours_at_reading = total(e.held() for e, g in settled.items() if e.generation == g)
        # taken after the reading: a leak that appeared meanwhile is memory the reading saw
        # (as the unloading row's or as the leak), so it is subtracted once, never twice
        self.leaked_at_reading = self.leaked()
        self.monitor.note_usage(self.table.usage())

    def leaked(self) -> Footprint:
        """Bytes per device providers report leaked (models unloaded whose objects are
        still referenced): held by this process, not by any row."""
        return total(p.leaked() for p in self.providers.values())

    def external(self) -> Footprint:
        """Bytes per device held by others, counting memory a provider reports as leaked (a
        model object still referenced after its unload) as others' too: :meth:`others` on
        the measured GPUs that have a budget, and on other devices the leak alone."""
        measured = {d for d in self.budgets if d.startswith("cuda:")}
        beyond = self.others(leaked=EMPTY)  # the leak is added below, on every device
        return Footprint({d: n for d, n in beyond.items() if d in measured}) + self.leaked()

    def others(self, leaked: Footprint | None = None) -> dict[str, int]:
        """Bytes held by others on every device the last reading measured.  The reading
        already includes the leak as it was then, so what it saw beyond our rows and that
        leak is other processes', and the leak as it is *now* (``leaked``, default
        :meth:`leaked`) is added once: ``max(0, used - ours - leaked_then) + leaked_now``."""
        leaked_now = self.leaked() if leaked is None else leaked
        return {
            r.device: max(0, r.used - self.ours_at_reading.on(r.device) - self.leaked_at_reading.on(r.device))
            + leaked_now.on(r.device)
            for r in self.readings
        }

    def usage(self) -> Footprint:
        return self.table.usage()

    def external_detail(self, external: Footprint) -> dict[str, str]:
        """Per device where ``external`` (what :meth:`external` answered) really is: this
        process's leaks named by the model whose unload left them, and the rest as other
        processes'."""
        by_model: dict[str, dict[str, int]] = {}
        for provider in self.providers.values():
            for model, memory in provider.leaked_models().items():
                by_model[model] = memory
        leaked = self.leaked()
        out = {}
        for device, n in external.items():
            parts = [
                f"{format_size(m[device])} still held by this process after unloading {name}"
                for name, m in by_model.items()
                if m.get(device)
            ]
            unnamed = leaked.on(device) - sum(m.get(device, 0) for m in by_model.values())
            if unnamed > 0:
                parts.append(f"{format_size(unnamed)} still held by this process after unloads")
            others = n - leaked.on(device)
            if others > 0:
                parts.append(f"{format_size(others)} used by other processes")
            out[device] = ", ".join(parts)
        return out

    # -- signals ----------------------------------------------------------------------------

    def notify(self) -> None:
        """Wake every admission waiting for memory or for the table to change (free when
        nobody waits: the lease hot path calls it)."""
        if self._waiting:
            changed, self._changed = self._changed, anyio.Event()
            changed.set()

    async def changed(self, timeout: float) -> None:
        """Return at the next change, or after ``timeout`` seconds."""
        self._waiting += 1
        try:
            with anyio.move_on_after(timeout):
                await self._changed.wait()
        finally:
            self._waiting -= 1

    def problem(self, component: str, exc: BaseException, model: str = "") -> None:
        """Background work failed: remember it (``status().problems``), tell subscribers."""
        text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ModelMoraError) else str(exc)
        self.problems[component] = text
        self.bus.emit(ev.Problem(model=model, component=component, error=text))

    def recovered(self, component: str) -> None:
        self.problems.pop(component, None)

    def describe_holders(self, names: tuple[str, ...]) -> str:
        out = []
        for name in names:
            e = self.table.get(name)
            if e is not None:
                out.append(f"{name}: {e.state.value}, {e.leases} lease(s), {format_size(e.held().total)}")
        return ", ".join(out) or "nothing known"

    def holders_of_memory(self, exclude: str) -> Mapping[str, int]:
        return {e.name: e.held().total for e in self.table if e.name != exclude and e.held()}


__all__ = ["Core", "Failure", "Outage", "unreachable"]
