"""Loads and wakes: admission, evictions, the provider call, and what a failure leaves.

* a load runs as a task of the manager's task group: a caller that gives up never aborts
  a load others wait for; every waiter of one load sees the same result (``attempt``);
* admission and the reservation it leads to happen with no ``await`` in between (under
  :attr:`Admission.turn`); victims are claimed in the same step, and the load starts
  only once they are gone;
* a load or wake that fails after the runtime was called is *discarded* (a best-effort,
  shielded unload of its handle, or ``Provider.discard`` when a load returned none), so
  nothing half-loaded stays behind; its memory stays reserved until that cleanup is
  done, and when the cleanup fails a reconcile adopts whatever the runtime still holds;
* a timeout names the limit that fired: the manager's ``load_timeout``, or the
  provider's own message when its own limit fired;
* a load nobody waits for any more (every caller of ``use()`` or ``load()`` left:
  cancelled, timed out, an HTTP client gone) is dropped before the runtime is asked, and
  stopped once it was (the provider's load is cancelled and discarded, as a timeout does;
  every provider's ``load`` allows that), with a :class:`~modelmora.events.LoadAbandoned`
  event either way;
* a failed load cools down (``failure_cooldown`` doubling to ``failure_cooldown_max``)
  before the next attempt, unless the caller passes ``retry=True``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio

from .. import events as ev
from ..errors import (
    ConfigError,
    HeldByLeases,
    InsufficientMemory,
    LoadDeferred,
    LoadFailed,
    ManagerClosed,
    ModelMoraError,
    ModelMoraTimeout,
    OutOfMemory,
    ProviderOutage,
    RecentlyFailed,
    TransientError,
    UnknownModel,
    UnloadFailed,
)
from ..footprint import Footprint
from ..oom import out_of_memory
from ..providers.base import Handle, Provider
from ..spec import format_duration, format_memory, format_size
from .admission import Admission
from .context import Core, Failure, unreachable
from .lifecycle import Action, Entry, State
from .outcome import Attempt
from .planner import Admit, Plan, Refuse, Wait, on_devices, share_of
from .transitions import Transitions

log = logging.getLogger("modelmora")
T = TypeVar("T")


class Abandoned(Exception):
    """Every caller waiting for a load has gone away: stop waiting for memory."""


class Superseded(Exception):
    """A parked model whose wake was waiting for memory left the table meanwhile (a forced
    unload, the runtime dropped it): its waiters start over with a fresh load."""


async def _nothing() -> None:
    return None


class Loader:
    def __init__(self, core: Core, admission: Admission, transitions: Transitions):
        self.core = core
        self.admission = admission
        self.transitions = transitions
        self.reconcile: Callable[[], Awaitable[None]] = _nothing  # set by the manager
        self._running: dict[Entry, anyio.CancelScope] = {}  # loads the runtime is running now

    def stop_unwanted(self, entry: Entry) -> None:
        """Stop the runtime's load of ``entry`` where nobody waits for it any more (no
        holder, no waiter); it ends as :class:`Abandoned`.  A no-op otherwise, and for
        wakes (a parked model nobody wakes stays parked)."""
        scope = self._running.get(entry)
        if scope is not None and entry.leases == 0:
            scope.cancel()

    async def _stoppable_load(self, provider: Provider, entry: Entry) -> Handle:
        """``provider.load`` bounded by the model's ``load_timeout``, and stopped by
        :meth:`stop_unwanted` (Abandoned)."""
        with anyio.CancelScope() as scope:
            self._running[entry] = scope
            try:
                return await self._bounded(provider.load(entry.spec), entry, "loading")
            finally:
                self._running.pop(entry, None)
        raise Abandoned

    # -- load and wake --------------------------------------------------------------------

    def start_load(self, entry: Entry) -> None:
        """Run the load (QUEUED) or wake (SLEEPING) of ``entry`` as work of the manager:
        its outcome is a fresh :class:`Attempt` that every waiter reads."""
        kind = "wake" if entry.state is State.SLEEPING else "load"
        attempt = Attempt()
        self.core.spawn(lambda: self._load(entry, attempt), name=f"modelmora-{kind}-{entry.name}")
        entry.attempt = attempt

    async def _load(self, entry: Entry, attempt: Attempt) -> None:
        core = self.core
        waking = entry.state is State.SLEEPING
        called = False  # the runtime was asked: a failure from here on may leave something
        try:
            provider = core.provider(entry.provider)
            if not waking:
                entry.spec = await provider.prepare(entry.spec)
                core.lifecycle.update(entry, estimate=self._estimate(entry))
            await self._admit(entry)
            if waking and entry.died is not None:  # its runtime died while we made room
                core.lifecycle.apply(entry, Action.REQUEUE)
                self.transitions.settle(entry)
                raise Superseded
            if not waking:
                await core.hooks.before("before_load", entry.spec)  # bounded; never raises
            started = core.clock()
            called = True
            if waking:
                assert entry.handle is not None
                woke = await self._bounded(provider.wake(entry.handle), entry, "waking")
                core.lifecycle.apply(
                    entry,
                    Action.WOKE,
                    ev.Woke(model=entry.name, duration_s=core.clock() - started, memory=dict(woke)),
                    measured=Footprint(woke) if woke else entry.active,
                )
                if self.transitions.settle(entry):
                    attempt.again()  # it died meanwhile: the waiters load afresh
                else:
                    attempt.ready()
            else:
                for retry in (False, True):  # an out-of-memory load is retried once, never twice
                    core.bus.emit(
                        ev.Loading(
                            model=entry.name,
                            provider=entry.provider,
                            estimate=entry.estimate.as_dict(),
                            device=entry.spec.device,
                            devices=list(entry.spec.runs_on),
                            note="; ".join(n for n in (entry.placement, self._unknown_note(entry)) if n),
                        )
                    )
                    try:
                        handle = await self._stoppable_load(provider, entry)
                        break
                    except Abandoned:
                        raise
                    except Exception as exc:
                        oom = out_of_memory(exc)
                        if oom is None:
                            raise
                        if retry:
                            raise self._out_of_memory(entry, oom, again=True) from exc
                        if not await self._raise_estimate(entry, oom):
                            raise self._out_of_memory(entry, oom, again=False) from exc
                        await self._admit(entry)  # evicts as the planner chooses, or refuses
                        started = core.clock()
                seconds = core.clock() - started
                measured = Footprint(handle.memory) if handle.memory else entry.estimate
                entry.owned, entry.loaded_at = handle.owned, core.clock()
                core.measured(entry.name, measured, seconds)
                core.raised.pop(entry.name, None)  # measured: an estimate raised by an OOM is moot
                core.lifecycle.apply(
                    entry,
                    Action.LOADED,
                    ev.Loaded(
                        model=entry.name,
                        provider=entry.provider,
                        duration_s=seconds,
                        memory=measured.as_dict(),
                        estimate=entry.estimate.as_dict(),
                    ),
                    measured=measured,
                    handle=handle,
                )
                core.failures.pop(entry.name, None)
                core.provider_up(entry.provider)
                attempt.ready()  # the same step: the waiters are served now, not after the evictions
                self.transitions.watch(entry)
                await core.hooks.after("after_load", entry.spec)
            entry.last_used = core.clock()
            core.monitor.note_usage(core.usage())
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._failed(entry, attempt, exc, waking=waking, called=called)
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            return
        finally:
            attempt.again()  # never left unsettled (no-op once settled)
        if entry.state is State.READY:
            await self._rebalance(entry)

    # -- out of memory anyway ----------------------------------------------------------------

    def _estimate(self, entry: Entry) -> Footprint:
        """The spec's estimate, or what an out-of-memory load raised it to, if larger (kept
        until a load measures the model)."""
        spec = entry.spec
        raised = self.core.raised.get(entry.name)
        if raised is None:
            return Footprint(spec.memory)
        return Footprint(on_devices(spec.memory, spec.runs_on)).maximum(on_devices(raised, spec.runs_on))

    def _free(self, entry: Entry, oom: OutOfMemory) -> int | None:
        """What was free on the entry's device: what the runtime said, else the budget less
        what the other rows and other processes hold."""
        if oom.free is not None:
            return oom.free
        core, device = self.core, entry.spec.device
        budget = core.budgets.get(device)
        if budget is None:
            return None
        others = core.usage().on(device) - entry.held().on(device) + core.external().on(device)
        return max(0, budget - others)

    async def _raise_estimate(self, entry: Entry, oom: OutOfMemory) -> bool:
        """After a load ran out of memory: clean up what it left, give its reservation
        back and raise its estimate on its device, so the retry's admission makes room.

        The rule, on the device: the reservation plus what the failed allocation asked
        for when the runtime says so (torch, llama.cpp); else what the runtime says the
        model needs in all (Ollama); else 1.25 × the reservation (vLLM's cache blocks);
        always at least one byte more than the reservation.
        Returns False when the cleanup failed (the runtime may still hold the model: no
        retry)."""
        core, device = self.core, entry.spec.device
        if not await self.transitions.discard(entry):
            return False
        reserved = entry.reservation
        before = reserved.on(device)
        if oom.needed:
            after = before + oom.needed
        elif oom.required:
            after = max(before + 1, oom.required)
        else:
            after = max(before + 1, math.ceil(before * 1.25))
        raised = Footprint({**reserved.as_dict(), device: after})
        core.raised[entry.name] = raised
        core.lifecycle.apply(entry, Action.REQUEUE, estimate=raised)
        self.transitions.settle(entry)
        core.bus.emit(
            ev.OutOfMemoryRetry(
                model=entry.name,
                provider=entry.provider,
                device=device,
                error=str(oom),
                estimate=reserved.as_dict(),
                raised=raised.as_dict(),
                free=self._free(entry, oom),
            )
        )
        return True

    def _out_of_memory(self, entry: Entry, oom: OutOfMemory, *, again: bool) -> OutOfMemory:
        device = entry.spec.device
        estimate = entry.reservation.on(device)
        free = self._free(entry, oom)
        what = (
            "again, after raising its estimate and making room" if again else "(not retried: cleanup failed)"
        )
        asked = f", the failed allocation asked for {format_size(oom.needed)}" if oom.needed else ""
        error = OutOfMemory(
            f"loading {entry.name!r} ran out of memory on {device} {what}: reserved "
            f"{format_size(estimate)}, {format_size(free) if free is not None else 'unknown'} free{asked} "
            f"({oom})",
            model=entry.name,
            provider=entry.provider,
            device=device,
            needed=oom.needed,
            free=free,
            estimate=estimate,
        )
        error.__cause__ = oom
        return error

    @staticmethod
    def _unknown_note(entry: Entry) -> str:
        if not entry.size_unknown:
            return ""
        return (
            f"size unknown (no memory estimate, never measured): reserved the free "
            f"{format_memory(entry.estimate.as_dict(), 'nothing')} and loads alone on {entry.spec.device} "
            "until it has measured"
        )

    async def _bounded(self, call: Awaitable[T], entry: Entry, what: str) -> T:
        timeout = entry.spec.load_timeout
        with anyio.move_on_after(timeout if math.isfinite(timeout) else None) as scope:
            return await call
        assert scope.cancelled_caught
        raise LoadFailed(
            f"{what} {entry.name!r} took longer than its load_timeout of {format_duration(timeout)}",
            model=entry.name,
            provider=entry.provider,
        )

    async def _failed(
        self, entry: Entry, attempt: Attempt, exc: BaseException, *, waking: bool, called: bool
    ) -> None:
        """Clean up after a load or wake that did not happen, then settle ``attempt``, in
        the same step as the row leaves the table (or goes back to its warm tier), with
        the failure recorded for the cool-down in that step too."""
        core = self.core
        cleaned = True
        if called and entry.state in (State.LOADING, State.WAKING):
            cleaned = await self.transitions.discard(entry)  # still reserved meanwhile
        superseded = isinstance(exc, Superseded)
        abandoned = isinstance(exc, Abandoned)
        error = None if superseded or abandoned else self._load_error(entry, exc)
        retry_after: float | None = None
        if error is not None and self._cools_down(exc):
            retry_after = self._record_failure(entry.name, error)
        elif (
            error is not None
            and unreachable(error)
            and not isinstance(error, ProviderOutage)
            and entry.provider in core.providers  # not a runtime that was never there
        ):
            outage = core.provider_down(entry.provider, error)
            retry_after = outage.until - core.clock()
            # its callers learn it as every later caller will: an outage, and when to retry
            error = self._outage_error(entry.provider, entry.name, outage.since, retry_after, error)
        if entry.state in (State.QUEUED, State.LOADING) or (entry.state is State.WAKING and called):
            self.transitions.leave(entry, Action.FAIL)
        elif entry.state is State.WAKING:
            core.lifecycle.apply(entry, Action.REQUEUE)  # never left the warm tier
            if self.transitions.settle(entry):
                superseded = True  # it died meanwhile: nothing of it is left to wake
        if superseded or error is None:
            attempt.again()  # nothing failed: the waiters take the model afresh
        else:
            attempt.failed(error)
        if abandoned:  # a caller that came meanwhile was answered AGAIN: it loads afresh
            stage = "loading" if called else "admission"
            core.bus.emit(ev.LoadAbandoned(model=entry.name, provider=entry.provider, stage=stage))
        if error is not None and not isinstance(exc, LoadDeferred | anyio.get_cancelled_exc_class()):
            core.bus.emit(
                ev.LoadFailed(
                    model=entry.name, provider=entry.provider, error=str(error), retry_after_s=retry_after
                )
            )
        if not cleaned and not core.closing:  # count what the runtime may still hold
            with anyio.move_on_after(core.config.unload_timeout):
                await self.reconcile()  # never raises

    @staticmethod
    def _cools_down(exc: BaseException) -> bool:
        """Whether a failure starts the cool-down: the runtime failed the model, not
        admission, a deadline, the configuration, a transient outage or a shutdown."""
        return not isinstance(
            exc,
            InsufficientMemory
            | ModelMoraTimeout
            | UnknownModel
            | ConfigError
            | TransientError
            | Abandoned
            | LoadDeferred
            | ManagerClosed
            | anyio.get_cancelled_exc_class(),
        )

    def _load_error(self, entry: Entry, exc: BaseException) -> BaseException:
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            return ManagerClosed(f"the manager shut down while {entry.name!r} was loading", model=entry.name)
        if isinstance(exc, ModelMoraError):
            return exc
        error = LoadFailed(
            f"loading {entry.name!r} failed: {type(exc).__name__}: {exc}",
            model=entry.name,
            provider=entry.provider,
        )
        error.__cause__ = exc
        return error

    def check_backoff(self, name: str, retry: bool) -> None:
        failure = self.core.failures.get(name)
        if failure is None or retry:
            return
        now = self.core.clock()
        remaining = failure.until - now
        if remaining > 0:
            raise RecentlyFailed(
                f"{name!r} failed to load {format_duration(now - failure.at)} ago ({failure.error}); "
                f"next attempt allowed in {format_duration(remaining)}, or pass retry=True",
                model=name,
                retry_after=remaining,
                cause=failure.error,
            )

    def check_outage(self, provider: str, name: str, retry: bool = False) -> None:
        """Refuse ``name`` at once while its provider's runtime is known to be unreachable
        and cooling down (``retry=True`` skips the cool-down, not the evidence admission
        gathers before it evicts anything)."""
        outage = self.core.outages.get(provider)
        if outage is None or retry:
            return
        now = self.core.clock()
        remaining = outage.until - now
        if remaining > 0:
            raise self._outage_error(provider, name, outage.since, remaining, outage.error)

    def _outage_error(
        self, provider: str, name: str, since: float, remaining: float, cause: BaseException
    ) -> ProviderOutage:
        now = self.core.clock()
        return ProviderOutage(
            f"cannot load {name!r}: provider {provider!r} has been unreachable for {format_duration(now - since)} "
            f"({cause}); asked again in {format_duration(remaining)}",
            model=name,
            provider=provider,
            retry_after=remaining,
            since=since,
            cause=cause,
        )

    def _record_failure(self, name: str, error: BaseException) -> float:
        config, now = self.core.config, self.core.clock()
        previous = self.core.failures.get(name)
        count = previous.count + 1 if previous else 1
        cooldown = min(config.failure_cooldown * 2.0 ** (count - 1), config.failure_cooldown_max)
        self.core.failures[name] = Failure(count, now, now + cooldown, error)
        return cooldown

    # -- admission ------------------------------------------------------------------------------

    async def _admit(self, entry: Entry) -> None:
        """Wait for memory, evict or park what the planner chose, reserve ours.

        Returns with ``entry`` reserved (LOADING or WAKING) by a decision taken on a fresh
        reading with nothing left to evict: after evictions the plan is made again, so
        memory someone took while they ran is seen before the runtime is called.  The
        whole admission — readings, the reconcile before evicting, evictions, waiting — is
        bounded by ``wait_timeout`` (ModelMoraTimeout), so a runtime that does not answer
        cannot hold a caller past its deadline."""
        core = self.core
        timeout = core.config.wait_timeout
        why = ["no decision yet"]
        with anyio.move_on_after(timeout if math.isfinite(timeout) else None) as scope:
            await self._admission_loop(entry, why)
            return
        assert scope.cancelled_caught
        raise ModelMoraTimeout(
            f"timed out after {format_duration(timeout)} waiting for memory to load {entry.name!r}: {why[0]}",
            model=entry.name,
        )

    async def _admission_loop(self, entry: Entry, why: list[str]) -> None:
        core = self.core
        deadline = core.clock() + core.config.wait_timeout
        reconciled = False
        blocked: list[Entry] = []
        last: tuple[str, ...] | None = None
        waiting = ""  # the last Wait's reason: what a timeout while looking again reports
        if not entry.background:  # a background load never goes ahead of anyone
            self.admission.arrive(entry)
        try:
            while True:
                self._check_wanted(entry)
                victims: list[Entry] = []
                sleepers: list[Entry] = []
                why[0] = f"{waiting}; looking again" if waiting else "reading the devices' memory"
                async with self.admission.turn:  # first come, first served; never held to wait
                    await core.refresh_readings()
                    self._check_wanted(entry)
                    plan = self.admission.decide(entry)  # our own reservation is not counted
                    if isinstance(plan, Admit) and (first := self.admission.first_in_line(entry)):
                        # memory freed while we held the turn: an admission waiting since
                        # before us takes it first (it was woken, and decides after us)
                        plan = Wait(blockers=(), reason=f"{first.name!r} waits for memory since before")
                    if entry.background and entry.leases <= 1:
                        self._give_way(entry, plan)
                    if isinstance(plan, Admit) and not plan.evict and not plan.sleep:
                        if entry.state in (State.QUEUED, State.SLEEPING):
                            self._reserve(entry, plan)
                        elif plan.reserve and entry.state is State.LOADING:
                            core.lifecycle.update(entry, estimate=Footprint(plan.reserve))  # as free now
                        return
                    if entry.state in (State.LOADING, State.WAKING):
                        core.lifecycle.apply(entry, Action.REQUEUE)  # the world moved: start over
                        self.transitions.settle(entry)  # a death meanwhile: Superseded next
                    if reconciled and isinstance(plan, Admit):
                        # reserve ours and claim the victims' memory in one step: no await
                        victims = [v for v in (core.table.get(n) for n in plan.evict) if v is not None]
                        sleepers = [s for s in (core.table.get(n) for n in plan.sleep) if s is not None]
                        self._reserve(entry, plan, claims=(*victims, *sleepers))
                        for v in victims:
                            reason = f"evicted: {plan.reasons.get(v.name, '')}"
                            self.transitions.begin_unload(v, reason=reason, evicted_for=entry)
                        for s in sleepers:
                            self.transitions.begin_park(s, evicted_for=entry)
                if not reconciled:
                    reconciled = True  # runtime truth before evicting, waiting or refusing
                    why[0] = "the runtimes did not answer what they hold (reconcile)"
                    await self.reconcile()
                    self.check_outage(entry.provider, entry.name)  # found down: no reason to evict
                    continue
                if isinstance(plan, Admit):
                    waiting = ""  # what it waited for is gone
                    why[0] = f"evicting {', '.join((*plan.evict, *plan.sleep))}"
                    failures = await self._finish_all(victims, sleepers, reason=plan.reasons)
                    core.lifecycle.update(entry, claims=())
                    if failures:
                        core.lifecycle.apply(entry, Action.REQUEUE)
                        self.transitions.settle(entry)
                        name, exc = failures[0]
                        raise InsufficientMemory(
                            f"cannot make room for {entry.name!r}: evicting {name!r} failed ({exc})",
                            model=entry.name,
                            would_evict=plan.evict,
                        )
                    continue  # decide again on a fresh reading before calling the runtime
                if isinstance(plan, Refuse):
                    raise self._refusal(entry, plan)
                why[0] = waiting = f"{plan.reason} (held by {core.describe_holders(plan.blockers)})"
                self._check_held_past(entry, plan, deadline)
                if plan.blockers != last:
                    core.bus.emit(ev.Waiting(model=entry.name, blockers=plan.blockers, reason=plan.reason))
                    self.admission.unblock(entry, blocked)
                    blocked, last = self.admission.block(entry, plan.blockers), plan.blockers
                remaining = deadline - core.clock()
                if remaining <= 0:
                    raise ModelMoraTimeout(
                        f"timed out after {format_duration(core.config.wait_timeout)} waiting for memory to "
                        f"load {entry.name!r}: {why[0]}",
                        model=entry.name,
                    )
                # memory other processes free changes no row: look again now and then
                await core.changed(min(remaining, core.config.reaper_interval))
        finally:
            self.admission.unblock(entry, blocked)
            self.admission.leave(entry)

    def _check_held_past(self, entry: Entry, plan: Wait, deadline: float) -> None:
        """Refuse at once when every model this load waits for is held only by leases that
        say they are held past its ``deadline`` (:meth:`Lease.hold`): waiting could only
        end in a timeout."""
        core = self.core
        held: list[tuple[float, str]] = []
        for name in plan.blockers:
            blocker = core.table.get(name)
            if (
                blocker is None
                or blocker.holders == 0
                or blocker.waiters
                or len(blocker.holds) < blocker.holders
                or min(until for until, _ in blocker.holds.values()) <= deadline
            ):
                return  # something may let go in time: wait
            held.extend(blocker.holds.values())
        if not held:
            return
        now = core.clock()
        texts = [f"{who}, {format_duration(until - now)} left" for until, who in sorted(held)]
        raise HeldByLeases(
            f"cannot load {entry.name!r}: {plan.reason}, and the leases holding that memory are held "
            f"past this load's {format_duration(core.config.wait_timeout)} wait: {'; '.join(texts)}",
            model=entry.name,
            held=texts,
            retry_after=min(until for until, _ in held) - now,
        )

    def _give_way(self, entry: Entry, plan: Plan) -> None:
        """A background load (the baseline model) goes ahead only into free memory with
        nothing else loading or waiting; otherwise it gives way (LoadDeferred).  Called
        while holding the admission's turn, so the answer holds until it reserves."""
        core = self.core
        if isinstance(plan, Admit) and (plan.evict or plan.sleep):
            reason = f"would evict {', '.join((*plan.evict, *plan.sleep))}"
        elif not isinstance(plan, Admit):
            reason = plan.reason
        else:
            reason = core.table.busy(exclude=entry) or ""
        if reason:
            raise LoadDeferred(f"background load of {entry.name!r} gave way: {reason}", model=entry.name)

    def _check_wanted(self, entry: Entry) -> None:
        """Still ours to load or wake: in the table, not being unloaded, and wanted."""
        if (
            entry.state not in (State.QUEUED, State.LOADING, State.SLEEPING, State.WAKING)
            or self.core.table.get(entry.name) is not entry
        ):
            raise Superseded
        if entry.leases == 0:
            raise Abandoned

    def _reserve(self, entry: Entry, plan: Admit, claims: tuple[Entry, ...] = ()) -> None:
        """QUEUED → LOADING or SLEEPING → WAKING, with what the plan reserves for a model
        of unknown size (the device's free headroom: ``Admit.reserve``)."""
        action = Action.WAKE if entry.state is State.SLEEPING else Action.ADMIT
        facts: dict[str, Any] = {}
        if plan.device is not None and action is Action.ADMIT:
            # placement: the runtime loads it where the planner chose (torch .to(device),
            # llama.cpp's CUDA_VISIBLE_DEVICES, ...), and its memory is counted there
            # (a model of several gpus: its shares, and the chosen set as its devices)
            device, spec = plan.device, entry.spec
            options = self.admission.options(entry)
            devices = plan.devices or (device,)

            def there(memory: Mapping[str, int]) -> dict[str, int]:
                return on_devices(share_of(memory, options, spec.gpus), devices)

            entry.spec = spec.model_copy(
                update={
                    "device": device,
                    "memory": there(spec.memory),
                    "devices": list(devices if spec.gpus > 1 else options),
                }
            )
            entry.placement = plan.placement
            facts["estimate"] = Footprint(there(entry.estimate))
            if entry.measured is not None:
                facts["measured"] = Footprint(there(entry.measured))
        if plan.reserve and action is Action.ADMIT:
            facts["estimate"] = Footprint(plan.reserve)
        self.core.lifecycle.apply(entry, action, claims=claims, **facts)

    async def _finish_all(
        self, victims: list[Entry], sleepers: list[Entry], reason: Mapping[str, str]
    ) -> list[tuple[str, BaseException]]:
        failures: list[tuple[str, BaseException]] = []

        async def unload(v: Entry) -> None:
            try:
                await self.transitions.finish_unload(v)
            except UnloadFailed as exc:
                failures.append((v.name, exc))

        async def park(s: Entry) -> None:
            try:
                await self.transitions.finish_park(s, reason=f"evicted: {reason.get(s.name, '')}")
            except UnloadFailed as exc:
                failures.append((s.name, exc))

        # unloads first, then parks: a park moves bytes into host RAM that the plan may
        # count as freed by a victim, so it never starts while that victim still holds them
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for v in victims:
                    tg.start_soon(unload, v)
            async with anyio.create_task_group() as tg:
                for s in sleepers:
                    tg.start_soon(park, s)
        return failures

    def _refusal(self, entry: Entry, plan: Refuse) -> InsufficientMemory:
        holders = dict(self.core.holders_of_memory(entry.name))
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
        """A load measured more than it reserved: evict or park idle models (as the planner
        chooses) until back in budget; warn when only busy models could make room.

        Runs after the load's waiters are served: the model is ready, and these unloads
        (each bounded by ``unload_timeout``) concern other models."""
        plan = self.admission.decide(entry, self.admission.candidate(entry, entry.active.items()))
        if isinstance(plan, Admit) and not plan.evict and not plan.sleep:
            return
        if isinstance(plan, Admit):
            table = self.core.table
            victims = [v for v in (table.get(n) for n in plan.evict) if v is not None and v.is_evictable()]
            sleepers = [s for s in (table.get(n) for n in plan.sleep) if s is not None and s.is_evictable()]
            for v in victims:
                self.transitions.begin_unload(
                    v, reason="evicted: measured size over estimate", evicted_for=entry
                )
            for s in sleepers:
                self.transitions.begin_park(s, evicted_for=entry)
            await self._finish_all(
                victims, sleepers, reason={s.name: "measured size over estimate" for s in sleepers}
            )
        else:
            log.warning(
                "%s measured %s, more than its estimate; the budget is exceeded until something is released",
                entry.name,
                format_size(entry.active.total),
            )


__all__ = ["Abandoned", "Loader"]
