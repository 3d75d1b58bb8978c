"""A fault-injecting fake runtime for testing the manager: :class:`FaultyProvider`.

Unlike :class:`~modelmora.providers.simulated.SimulatedProvider` (a dry-run runtime with
a few hooks), every operation here can be stopped half-way and decided by the test:

* ``hold(op, target)`` parks the next calls of ``op`` (``load``, ``unload``, ``sleep``,
  ``wake``, ``observe``, ``refresh``, ``adopt``) in :attr:`~FaultyProvider.pending`
  until ``release(op, target)`` lets them finish, or ``release(..., error=exc)`` makes
  them raise ``exc``: a modelmora error, or a *foreign* one (``OSError``,
  ``httpx.ConnectError``) as a real client library would raise;
* ``fail_next(op, target, exc)`` makes the next call raise at once;
* a held ``observe`` computes its answer when it is called and delivers it when released:
  a *stale observation*;
* the runtime misbehaves on its own: :meth:`~FaultyProvider.crash` (a runtime that dies;
  the provider tells the manager through ``report_lost`` where the manager offers it),
  :meth:`~FaultyProvider.evict` (dropped silently, as Ollama's scheduler or an OOM kill
  would), :meth:`~FaultyProvider.alias` (``x`` listed as ``x:latest``),
  :meth:`~FaultyProvider.add_foreign` (a model someone else loaded), and memory other
  processes take (:attr:`~FaultyProvider.external`, seen through :attr:`~FaultyProvider.probe`),
  and memory this process still holds for models already unloaded
  (:attr:`~FaultyProvider.leaks`: seen by the probe *and* reported by ``leaked()``, as a
  torch model object somebody still references is).

It keeps the **truth**: the models the runtime really holds (:attr:`~FaultyProvider.instances`)
and their bytes per device (:meth:`~FaultyProvider.held`), the bytes it has committed to
(held plus what pending loads and wakes will take, :meth:`~FaultyProvider.committed`), the
peak of what it held, and every call it received (:attr:`~FaultyProvider.calls`, and
``listeners`` told at the start of each call), so a test can check the manager against
what happened rather than against what the manager believes.

Everything runs in the event loop that calls the provider; the controls are plain methods
(call them from that loop, or between steps when the loop is idle).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from ..errors import LoadFailed
from ..footprint import Footprint
from ..memory import DeviceMemory, MemoryProbe
from ..providers.base import Capabilities, Handle, Observed, Provider, ProviderSettings, Tier
from ..spec import ModelSpec

Op = Literal["load", "unload", "sleep", "wake", "observe", "refresh", "adopt"]
OPS: tuple[Op, ...] = ("load", "unload", "sleep", "wake", "observe", "refresh", "adopt")
ANY = "*"
"""``target`` matching every target (and the only target of ``observe``)."""


def _add(into: dict[str, int], memory: Mapping[str, int], sign: int = 1) -> None:
    for device, n in memory.items():
        into[device] = into.get(device, 0) + sign * n


@dataclass
class Instance:
    """One model the runtime really holds."""

    id: int
    target: str  # the name it was loaded under (before any alias)
    memory: dict[str, int]  # bytes per device while active
    owned: bool = True
    parked_memory: dict[str, int] | None = None  # bytes while in the warm tier; None: active
    loaded: bool = False  # by a load() call (else someone else put it there)
    lent: int = 0  # handles lent for it (load or adopt)
    born: int = 0  # the number of the call that put it there (0: someone else did)

    @property
    def tier(self) -> Tier:
        return Tier.ACTIVE if self.parked_memory is None else Tier.SLEEPING

    @property
    def held(self) -> dict[str, int]:
        return dict(self.memory if self.parked_memory is None else self.parked_memory)


@dataclass
class Call:
    """One call the provider received.  ``outcome``: ``pending``, ``ok``, ``failed: …``
    or ``cancelled``."""

    seq: int
    op: Op
    target: str
    instance: int | None = None  # the instance it concerns, when there is one
    handle: Handle | None = field(default=None, repr=False)
    outcome: str = "pending"
    committed: dict[str, int] = field(default_factory=dict)  # after a load/wake started: see committed()
    partway: BaseException | None = None  # a load that raises this once the runtime holds the model
    surprise: dict[str, int] = field(default_factory=dict)  # after a load/wake started: see surprise()
    # bytes no model of the runtime holds at that moment: other processes' and leaks
    external: dict[str, int] = field(default_factory=dict)


class _Gate:
    def __init__(self) -> None:
        self.event = anyio.Event()
        self.error: BaseException | None = None


class FaultySettings(ProviderSettings):
    pass


class FaultyProbe(MemoryProbe):
    """Device readings as the runtime's truth makes them: ``used`` is what the runtime
    holds on the device plus :attr:`FaultyProvider.external`."""

    source = "faulty"

    def __init__(self, provider: FaultyProvider, devices: Mapping[str, int]):
        self.provider = provider
        self.devices = dict(devices)  # device → total bytes
        self.reads = 0

    def read(self) -> list[DeviceMemory]:
        self.reads += 1
        held = self.provider.held()
        out = []
        for device, total in self.devices.items():
            used = (
                held.get(device, 0)
                + self.provider.external.get(device, 0)
                + self.provider.leaks.get(device, 0)
            )
            out.append(DeviceMemory(device, total, used, max(0, total - used), self.source))
        return out


class FaultyProvider(Provider):
    """A runtime whose every operation a test controls, and which keeps the truth.

    ``devices`` (device → total bytes) are what :attr:`probe` reports as measured; pass
    that probe to the manager where a test needs measured memory.  A load takes
    ``options.actual_memory`` (bytes per device) when the spec gives it, else the spec's
    estimate, unless :meth:`measure` says otherwise.
    """

    Settings = FaultySettings
    capabilities = Capabilities(warm_tier=True, refresh=True)

    def __init__(
        self,
        name: str = "faulty",
        settings: FaultySettings | None = None,
        *,
        devices: Mapping[str, int] | None = None,
    ):
        super().__init__(name, settings)
        self.instances: dict[str, Instance] = {}  # target (before aliasing) → what is held
        self.external: dict[str, int] = {}  # device → bytes other processes hold
        self.leaks: dict[str, int] = {}  # device → bytes leaked by unloaded models (leaked())
        self.leaked_by: dict[str, dict[str, int]] = {}  # model → its part of leaks, where known
        self.report_awake = True  # observe() says what a sleeping model holds awake (Observed.awake)
        self.finish_cancelled_loads = False  # a cancelled load still lands, as Ollama's does
        self.closed = False  # aclose() was called: every call then fails as a closed client's
        self.calls_after_close: list[Call] = []
        self.calls: list[Call] = []
        self.pending: list[Call] = []
        self.listeners: list[Callable[[Call], None]] = []
        self.peak: dict[str, int] = {}  # of held(), per device
        self.probe = FaultyProbe(self, devices or {})
        self._aliases: dict[str, str] = {}  # target → the name observe() lists it under
        self._holds: dict[tuple[Op, str], int | None] = {}  # → calls left to hold (None: all)
        self._fail_next: dict[tuple[Op, str], list[BaseException]] = {}
        self._fail_always: dict[tuple[Op, str], BaseException] = {}
        self._measured: dict[str, dict[str, int]] = {}
        self._gates: dict[int, _Gate] = {}
        self._of_handle: dict[Handle, int] = {}  # handle → instance id
        self._handles: dict[int, list[Handle]] = {}  # instance id → handles lent for it
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._specs: dict[int, ModelSpec] = {}  # pending load → its spec
        self._partway: dict[str, list[BaseException]] = {}  # target → errors of loads failing partway
        self._answered: dict[int, Instance] = {}  # pending call → the crashed instance it answers for
        self._changed: anyio.Event | None = None

    # -- controls -----------------------------------------------------------------------

    def hold(self, op: Op, target: str = ANY, *, times: int | None = None) -> None:
        """Park the next ``times`` calls (all, when None) of ``op`` on ``target`` until released."""
        self._holds[(op, target)] = times

    def unhold(self, op: Op | None = None, target: str = ANY) -> None:
        """Stop holding new calls (``op`` None: every hold); pending ones stay pending."""
        for key in list(self._holds):
            if op is None or key == (op, target):
                del self._holds[key]

    def release(
        self,
        op: Op | None = None,
        target: str = ANY,
        *,
        error: BaseException | None = None,
        seq: int | None = None,
        partway: bool = False,
    ) -> list[Call]:
        """Let pending calls matching ``op``/``target`` (or the one numbered ``seq``)
        finish, or raise ``error`` (``partway``: a load raises it once the runtime holds
        the model, see :meth:`fail_partway`)."""
        released = []
        for call in list(self.pending):
            if (op is None or call.op == op) and target in (ANY, call.target) and seq in (None, call.seq):
                gate = self._gates.get(call.seq)
                if gate is not None:
                    if partway and call.op == "load" and error is not None:
                        call.partway, error_here = error, None
                    else:
                        error_here = error
                    gate.error = error_here
                    gate.event.set()
                released.append(call)
        return released

    def fail_next(
        self, op: Op, target: str = ANY, error: BaseException | None = None, *, times: int = 1
    ) -> None:
        """Make the next ``times`` calls of ``op`` on ``target`` raise ``error`` at once."""
        exc = error or LoadFailed(f"faulty runtime: {op} of {target!r} failed", provider=self.name)
        self._fail_next.setdefault((op, target), []).extend([exc] * times)

    def fail_partway(self, target: str = ANY, error: BaseException | None = None, *, times: int = 1) -> None:
        """Make the next ``times`` loads of ``target`` fail *partway*: the runtime holds the
        model (its memory, as a started process would) and the load raises ``error``
        anyway, leaving it behind for whoever cleans up."""
        exc = error or LoadFailed(f"faulty runtime: load of {target!r} failed partway", provider=self.name)
        self._partway.setdefault(target, []).extend([exc] * times)

    def fail_always(self, op: Op, target: str = ANY, error: BaseException | None = None) -> None:
        """Make every call of ``op`` on ``target`` raise ``error`` until :meth:`heal`."""
        self._fail_always[(op, target)] = error or LoadFailed(
            f"faulty runtime: {op} of {target!r} failed", provider=self.name
        )

    def heal(self, op: Op | None = None, target: str = ANY) -> None:
        """Forget the failures set up for ``op`` on ``target`` (``op`` None: all of them)."""
        for table in (self._fail_always, self._fail_next):
            for key in list(table):
                if op is None or key == (op, target):
                    del table[key]
        if op in (None, "load"):
            for name in list(self._partway):
                if op is None or name == target:
                    del self._partway[name]

    def leak(self, model: str, memory: Mapping[str, int]) -> None:
        """``model``'s unload left ``memory`` (bytes per device) held by this process, as a
        torch model object somebody still references: added to :attr:`leaks` and
        reported by ``leaked_models()`` under the model's name."""
        _add(self.leaks, memory)
        _add(self.leaked_by.setdefault(model, {}), memory)

    def measure(self, target: str, memory: Mapping[str, int]) -> None:
        """What the next loads of ``target`` really take, whatever the spec says."""
        self._measured[target] = dict(memory)

    def alias(self, target: str, listed_as: str | None) -> None:
        """Have :meth:`observe` list ``target`` as ``listed_as`` (None: as itself)."""
        if listed_as is None or listed_as == target:
            self._aliases.pop(target, None)
        else:
            self._aliases[target] = listed_as

    def add_foreign(
        self, target: str, memory: Mapping[str, int], *, tier: Tier = Tier.ACTIVE, owned: bool = False
    ) -> Instance:
        """A model someone else loaded into this runtime."""
        instance = Instance(next(self._ids), target, dict(memory), owned)
        if tier is Tier.SLEEPING:
            instance.parked_memory = Footprint(instance.memory).parked().as_dict()
        self._put(instance)
        return instance

    def evict(self, target: str) -> Instance | None:
        """The runtime drops ``target`` on its own and tells nobody."""
        instance = self.instances.pop(self._canonical(target), None)
        self._touch()
        return instance

    async def crash(
        self, target: str, reason: str = "the runtime crashed", *, answered: bool = False
    ) -> Instance | None:
        """The runtime of ``target`` dies.  The provider sees it, and reports each handle it
        lent for it through ``report_lost`` where the manager offers that.

        ``answered``: the ``sleep`` and ``wake`` calls pending on it still succeed when
        released, as a runtime that answered them and died right after (the answer and
        the death report reach the manager in either order)."""
        instance = self.instances.get(self._canonical(target))
        if instance is not None and answered:
            for call in self.pending:
                if call.instance == instance.id and call.op in ("sleep", "wake"):
                    self._answered[call.seq] = instance
        instance = self.evict(target)
        report = getattr(self, "report_lost", None)
        if instance is not None and callable(report):
            for handle in list(self._handles.get(instance.id, [])):
                result = report(handle, reason)
                if inspect.isawaitable(result):
                    await result
        return instance

    # -- truth --------------------------------------------------------------------------

    def held(self) -> dict[str, int]:
        """Bytes per device the runtime really holds now."""
        out: dict[str, int] = {}
        for instance in self.instances.values():
            _add(out, instance.held)
        return out

    def committed(self) -> dict[str, int]:
        """What it holds plus what pending loads and wakes will hold once they finish, and the
        host RAM pending sleeps will add (their warm copies)."""
        out = self.held()
        for call in self.pending:
            reused = self.instances.get(self._canonical(call.target)) if call.op == "load" else None
            if call.op == "load" and reused is None:
                _add(out, self._measured.get(call.target) or self._spec_memory(call))
            elif reused is not None and reused.parked_memory is not None:  # woken by the load
                _add(out, reused.memory)
                _add(out, reused.parked_memory, -1)
            elif call.op == "wake" and call.instance is not None:
                instance = self._by_id(call.instance)
                if instance is not None and instance.parked_memory is not None:
                    _add(out, instance.memory)
                    _add(out, instance.parked_memory, -1)
            elif call.op == "sleep" and call.instance is not None:  # its warm copy: host RAM grows
                instance = self._by_id(call.instance)
                if instance is not None and instance.parked_memory is None:
                    parked = Footprint(instance.memory).parked()
                    _add(out, {d: n - instance.memory.get(d, 0) for d, n in parked.items()})
        return {d: n for d, n in out.items()}

    def surprise(self) -> dict[str, int]:
        """Bytes per device the pending loads will hold beyond their spec's estimate
        (``options.actual_memory``, :meth:`measure`): part of :meth:`committed` that a
        manager reserving the estimate cannot foresee before the load measures it."""
        out: dict[str, int] = {}
        for call in self.pending:
            spec = self._specs.get(call.seq)
            if call.op != "load" or spec is None or self._canonical(call.target) in self.instances:
                continue
            actual = self._measured.get(call.target) or self._memory_of(spec)
            _add(out, {d: n - spec.memory.get(d, 0) for d, n in actual.items() if n > spec.memory.get(d, 0)})
        return out

    def instance_of(self, handle: Handle) -> Instance | None:
        """The instance ``handle`` was lent for, while the runtime still holds it."""
        instance_id = self._of_handle.get(handle)
        return None if instance_id is None else self._by_id(instance_id)

    def instance_id(self, handle: Handle) -> int | None:
        return self._of_handle.get(handle)

    def listed_as(self, target: str) -> str:
        return self._aliases.get(target, target)

    def target_key(self, target: str) -> str:
        """The runtime's identity for a target name: ``x`` and the name it is listed under
        are one model."""
        return self.listed_as(self._canonical(target))

    def observed_now(self) -> list[Observed]:
        return [
            Observed(
                target=self.listed_as(i.target), memory=i.held, tier=i.tier, owned=i.owned,
                details={"instance": i.id},
                awake=dict(i.memory) if i.tier is Tier.SLEEPING and self.report_awake else {},
            )
            for i in self.instances.values()
        ]  # fmt: skip

    async def wait_pending(self, op: Op, target: str = ANY, *, count: int = 1) -> list[Call]:
        """Until ``count`` calls of ``op`` on ``target`` are pending; returns them."""
        while True:
            found = [c for c in self.pending if c.op == op and target in (ANY, c.target)]
            if len(found) >= count:
                return found
            await self._wait_change()

    async def wait_calls(self, op: Op, target: str = ANY, *, count: int = 1) -> list[Call]:
        """Until ``count`` calls of ``op`` on ``target`` have been received (finished or not)."""
        while True:
            found = [c for c in self.calls if c.op == op and target in (ANY, c.target)]
            if len(found) >= count:
                return found
            await self._wait_change()

    # -- provider -----------------------------------------------------------------------

    async def load(self, spec: ModelSpec) -> Handle:
        async with self._call("load", spec.target, spec=spec) as call:
            instance = self.instances.get(self._canonical(spec.target))
            if instance is None:  # a resident target is reused, as Ollama does
                memory = self._measured.get(spec.target) or self._memory_of(spec)
                instance = Instance(next(self._ids), spec.target, memory, loaded=True, born=call.seq)
                self._put(instance)
            elif instance.parked_memory is not None:  # reused asleep: the load wakes it
                instance.parked_memory = None
                self._touch()
            if call.partway is not None:
                raise call.partway
            return self._lend(instance, spec, owned=True)

    async def unload(self, handle: Handle) -> dict[str, int]:
        instance_id = self._of_handle.get(handle)
        async with self._call("unload", handle.target, instance=instance_id, handle=handle):
            instance = self._by_id(instance_id) if instance_id is not None else None
            handle.close()
            if instance is None:
                return {}
            del self.instances[self._key_of(instance)]
            self._touch()
            return dict(instance.held)

    async def sleep(self, handle: Handle, level: int | None = None) -> dict[str, int]:
        instance_id = self._of_handle.get(handle)
        async with self._call("sleep", handle.target, instance=instance_id, handle=handle) as call:
            instance = self._alive(handle, instance_id, call)
            if instance.parked_memory is None:
                instance.parked_memory = Footprint(instance.memory).parked().as_dict()
                self._touch()
            return dict(instance.parked_memory)

    async def wake(self, handle: Handle) -> dict[str, int]:
        instance_id = self._of_handle.get(handle)
        async with self._call("wake", handle.target, instance=instance_id, handle=handle) as call:
            instance = self._alive(handle, instance_id, call)
            instance.parked_memory = None
            self._touch()
            return dict(instance.memory)

    def leaked(self) -> dict[str, int]:
        """Bytes per device set in :attr:`leaks`: held by this process for models already
        unloaded, and seen by :attr:`probe` like any memory on the device."""
        return {d: n for d, n in self.leaks.items() if n}

    def leaked_models(self) -> dict[str, dict[str, int]]:
        """:attr:`leaks` by model, where a test names the model (:attr:`leaked_by`)."""
        return {name: dict(memory) for name, memory in self.leaked_by.items() if memory}

    async def observe(self) -> list[Observed]:
        snapshot = self.observed_now()  # computed now, delivered when released: maybe stale
        async with self._call("observe", ANY):
            return snapshot

    async def adopt(self, observed: Observed, spec: ModelSpec) -> Handle:
        async with self._call("adopt", observed.target):
            instance = self.instances.get(self._canonical(observed.target))
            if instance is None:
                raise LoadFailed(
                    f"faulty runtime no longer has {observed.target!r}", model=spec.name, provider=self.name
                )
            return self._lend(instance, spec, owned=observed.owned)

    async def refresh(self, handle: Handle, keep_alive: float) -> None:
        instance_id = self._of_handle.get(handle)
        async with self._call("refresh", handle.target, instance=instance_id, handle=handle):
            return

    async def aclose(self) -> None:
        """Close the client: calls still pending fail, as requests in flight on a closed
        HTTP client do, and every call from now on fails (:attr:`calls_after_close`)."""
        self.closed = True
        self.release(error=RuntimeError("faulty runtime: the client has been closed"))

    # -- plumbing -----------------------------------------------------------------------

    def _landed_anyway(self, call: Call) -> None:
        """A load cancelled while pending still lands in the runtime
        (:attr:`finish_cancelled_loads`), as Ollama finishes a load whose request went away."""
        spec = self._specs.get(call.seq)
        if call.op != "load" or not self.finish_cancelled_loads or spec is None:
            return
        if self._canonical(spec.target) not in self.instances:
            memory = self._measured.get(spec.target) or self._memory_of(spec)
            self._put(Instance(next(self._ids), spec.target, memory, loaded=True, born=call.seq))

    def _call(
        self,
        op: Op,
        target: str,
        *,
        instance: int | None = None,
        handle: Handle | None = None,
        spec: ModelSpec | None = None,
    ) -> _CallScope:
        return _CallScope(self, op, target, instance, handle, spec)

    def _start(
        self, op: Op, target: str, instance: int | None, handle: Handle | None, spec: ModelSpec | None
    ) -> tuple[Call, _Gate | None]:
        call = Call(next(self._seq), op, target, instance, handle)
        if spec is not None:
            self._specs[call.seq] = spec
        self.calls.append(call)
        if self.closed:  # as an HTTP client used after aclose() raises
            self.calls_after_close.append(call)
            call.outcome = "failed: the client has been closed"
            self._notify(call)
            raise RuntimeError(f"faulty runtime: {op} of {target!r} after the client was closed")
        for key in ((op, target), (op, ANY)):
            errors = self._fail_next.get(key)
            exc = errors.pop(0) if errors else self._fail_always.get(key)
            if errors == []:
                del self._fail_next[key]
            if exc is not None:
                call.outcome = f"failed: {type(exc).__name__}: {exc}"
                self._notify(call)
                raise exc
        gate = None
        for key in ((op, target), (op, ANY)):
            if key in self._holds:
                left = self._holds[key]
                if left is not None:
                    if left <= 1:
                        del self._holds[key]
                    else:
                        self._holds[key] = left - 1
                gate = self._gates[call.seq] = _Gate()
                break
        if op == "load":
            for name in (target, ANY):
                partway = self._partway.get(name)
                if partway:
                    call.partway = partway.pop(0)
                    break
        self.pending.append(call)
        if op in ("load", "wake", "sleep"):
            call.committed = self.committed()
            call.surprise = self.surprise()
            call.external = {
                d: self.external.get(d, 0) + self.leaks.get(d, 0) for d in {*self.external, *self.leaks}
            }
        self._notify(call)
        return call, gate

    def _finish(self, call: Call, outcome: str) -> None:
        call.outcome = outcome
        if call in self.pending:
            self.pending.remove(call)
        self._gates.pop(call.seq, None)
        self._specs.pop(call.seq, None)
        self._answered.pop(call.seq, None)
        self._touch()

    def _notify(self, call: Call) -> None:
        for listener in list(self.listeners):
            listener(call)
        self._touch()

    def _touch(self) -> None:
        for device, n in self.held().items():
            if n > self.peak.get(device, 0):
                self.peak[device] = n
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_change(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def _spec_memory(self, call: Call) -> dict[str, int]:
        spec = self._specs.get(call.seq)
        return self._memory_of(spec) if spec is not None else {}

    @staticmethod
    def _memory_of(spec: ModelSpec) -> dict[str, int]:
        actual = spec.options.get("actual_memory")
        if isinstance(actual, Mapping):
            return {str(d): int(n) for d, n in actual.items()}
        return dict(spec.memory)

    def _canonical(self, name: str) -> str:
        """The target an (aliased or plain) name refers to."""
        if name in self.instances:
            return name
        for target, listed in self._aliases.items():
            if listed == name:
                return target
        return name

    def _key_of(self, instance: Instance) -> str:
        return next(k for k, v in self.instances.items() if v is instance)

    def _by_id(self, instance_id: int) -> Instance | None:
        return next((i for i in self.instances.values() if i.id == instance_id), None)

    def _put(self, instance: Instance) -> None:
        self.instances[instance.target] = instance
        self._touch()

    def _lend(self, instance: Instance, spec: ModelSpec, *, owned: bool) -> Handle:
        handle = Handle(
            spec=spec, provider=self.name, memory=instance.held, owned=owned, _obj=f"<faulty {spec.target}>"
        )
        self._of_handle[handle] = instance.id
        instance.lent += 1
        self._handles.setdefault(instance.id, []).append(handle)
        return handle

    def _alive(self, handle: Handle, instance_id: int | None, call: Call) -> Instance:
        instance = self._by_id(instance_id) if instance_id is not None else None
        instance = instance or self._answered.pop(call.seq, None)  # crashed, answering anyway
        if instance is None:
            raise LoadFailed(
                f"faulty runtime no longer has {handle.target!r}", model=handle.name, provider=self.name
            )
        return instance

    def describe(self) -> str:
        """One line of truth, for assertion messages."""
        held = ", ".join(
            f"{i.target}#{i.id}({i.tier.value}, {sum(i.held.values()) / 1e9:g} GB)"
            for i in self.instances.values()
        )
        pending = ", ".join(f"{c.op} {c.target}" for c in self.pending)
        return f"runtime holds [{held or 'nothing'}]; pending [{pending or 'nothing'}]"


class _CallScope:
    """One provider call: recorded, maybe failed at once, maybe held until released."""

    def __init__(
        self,
        provider: FaultyProvider,
        op: Op,
        target: str,
        instance: int | None,
        handle: Handle | None,
        spec: ModelSpec | None,
    ):
        self.provider = provider
        self.args = (op, target, instance, handle, spec)
        self.call: Call | None = None

    async def __aenter__(self) -> Call:
        call, gate = self.provider._start(*self.args)
        self.call = call
        if gate is not None:
            try:
                await gate.event.wait()
            except BaseException:
                self.provider._landed_anyway(call)
                self.provider._finish(call, "cancelled")
                raise
            if gate.error is not None:
                self.provider._finish(call, f"failed: {type(gate.error).__name__}: {gate.error}")
                raise gate.error
        return call

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        assert self.call is not None
        if exc is None:
            self.provider._finish(self.call, "ok")
        elif isinstance(exc, anyio.get_cancelled_exc_class()):
            self.provider._finish(self.call, "cancelled")
        else:
            self.provider._finish(self.call, f"failed: {type(exc).__name__}: {exc}")


def truth_table(provider: FaultyProvider) -> dict[str, tuple[Tier, dict[str, int]]]:
    """``{listed target: (tier, bytes per device)}``: what a reconciled table must match."""
    return {provider.listed_as(i.target): (i.tier, i.held) for i in provider.instances.values()}


def over_budget(usage: Mapping[str, int], budgets: Mapping[str, int]) -> dict[str, int]:
    """Devices where ``usage`` exceeds ``budgets``, with the excess."""
    return {d: usage.get(d, 0) - b for d, b in budgets.items() if usage.get(d, 0) > b}


def gb(n: float) -> int:
    """``n`` GB in bytes (10^9, as budgets are written)."""
    return round(n * 10**9)


def injected_error(kind: str, message: str = "injected fault") -> BaseException:
    """An exception of the kind a test names: ``modelmora`` (a :class:`LoadFailed`), or a
    foreign one as a client library raises it: ``oserror``, ``connect``
    (``httpx.ConnectError``), ``runtime`` (``RuntimeError``)."""
    if kind == "modelmora":
        return LoadFailed(message)
    if kind == "oserror":
        return OSError(message)
    if kind == "connect":
        import httpx

        return httpx.ConnectError(message)
    if kind == "runtime":
        return RuntimeError(message)
    raise ValueError(f"unknown error kind {kind!r}")


__all__ = [
    "ANY",
    "OPS",
    "Call",
    "FaultyProbe",
    "FaultyProvider",
    "FaultySettings",
    "Instance",
    "Op",
    "gb",
    "injected_error",
    "over_budget",
    "truth_table",
]
