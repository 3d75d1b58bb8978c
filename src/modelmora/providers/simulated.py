"""A runtime that only pretends: load/unload costs and sizes come from the spec.

Use it to dry-run a configuration (``modelmora plan``) and to test code built on the
manager without a GPU.  It is also the fake at the seam for modelmora's own tests, so it
has hooks to make the runtime misbehave: failing or hanging loads, models that vanish
behind the manager's back, models that someone else loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from ..errors import LoadFailed, ModelMoraError
from ..footprint import Footprint
from ..spec import Duration, ModelSpec
from .base import Capabilities, Handle, Observed, Provider, ProviderSettings, Tier


class SimulatedSettings(ProviderSettings):
    load_time: Duration = 0.0
    unload_time: Duration = 0.0


@dataclass
class _Resident:
    memory: dict[str, int]
    owned: bool = True
    asleep: dict[str, int] | None = None  # memory held while parked in the warm tier


@dataclass
class SimulatedStats:
    loads: int = 0
    unloads: int = 0
    failed: int = 0
    peak_concurrent_loads: int = 0
    sleeps: int = 0
    wakes: int = 0
    loading: set[str] = field(default_factory=set)


class SimulatedProvider(Provider):
    """Per model: ``options.load_time`` / ``options.unload_time`` (seconds) override the
    settings; ``options.actual_memory`` (bytes per device) is what a load "measures"."""

    Settings = SimulatedSettings
    settings: SimulatedSettings
    capabilities = Capabilities(warm_tier=True)

    def __init__(self, name: str = "simulated", settings: SimulatedSettings | None = None):
        super().__init__(name, settings)
        self.resident: dict[str, _Resident] = {}
        self.stats = SimulatedStats()
        self._fail_next: dict[str, list[BaseException]] = {}
        self._hang: set[str] = set()
        self.reachable = True

    # -- test hooks ---------------------------------------------------------------------

    def fail_next(self, target: str, error: BaseException | None = None, times: int = 1) -> None:
        """Make the next ``times`` loads of ``target`` raise ``error``."""
        exc = error or LoadFailed(f"simulated failure loading {target!r}", provider=self.name)
        self._fail_next.setdefault(target, []).extend([exc] * times)

    def hang(self, target: str, on: bool = True) -> None:
        """Make loads of ``target`` never finish (until cancelled)."""
        (self._hang.add if on else self._hang.discard)(target)

    def evict_behind_back(self, target: str) -> None:
        """The runtime drops a model on its own (like Ollama's scheduler or an OOM kill)."""
        self.resident.pop(target, None)

    def preload(self, target: str, memory: dict[str, int], *, owned: bool = False) -> None:
        """Something else loaded this model before the manager started."""
        self.resident[target] = _Resident(dict(memory), owned)

    # -- provider -----------------------------------------------------------------------

    async def load(self, spec: ModelSpec) -> Handle:
        if not self.reachable:
            from ..errors import ProviderUnavailable

            raise ProviderUnavailable(f"simulated runtime {self.name!r} unreachable", provider=self.name)
        target = spec.target
        self.stats.loading.add(target)
        self.stats.peak_concurrent_loads = max(self.stats.peak_concurrent_loads, len(self.stats.loading))
        try:
            self.stats.loads += 1
            delay = float(spec.options.get("load_time", self.settings.load_time))
            if target in self._hang:
                await anyio.sleep_forever()
            if delay:
                await anyio.sleep(delay)
            failures = self._fail_next.get(target)
            if failures:
                self.stats.failed += 1
                exc = failures.pop(0)
                if isinstance(exc, ModelMoraError) and exc.model is None:
                    exc.model = spec.name
                raise exc
            memory = {k: int(v) for k, v in spec.options.get("actual_memory", spec.memory).items()}
            self.resident[target] = _Resident(memory)
            return Handle(spec=spec, provider=self.name, memory=dict(memory), _obj=f"<simulated {target}>")
        finally:
            self.stats.loading.discard(target)

    async def unload(self, handle: Handle) -> dict[str, int]:
        delay = float(handle.spec.options.get("unload_time", self.settings.unload_time))
        if delay:
            await anyio.sleep(delay)
        gone = self.resident.pop(handle.target, None)
        self.stats.unloads += 1
        handle.close()
        return dict(gone.memory) if gone else {}

    def _resident(self, handle: Handle) -> _Resident:
        resident = self.resident.get(handle.target)
        if resident is None:
            raise LoadFailed(
                f"simulated runtime no longer has {handle.target!r}", model=handle.name, provider=self.name
            )
        return resident

    async def sleep(self, handle: Handle, level: int | None = None) -> dict[str, int]:
        """Weights to host RAM: GPU memory drops to nothing, RAM takes what the GPU held."""
        resident = self._resident(handle)
        await self._delay(handle, "sleep_time")
        resident.asleep = Footprint(resident.memory).parked().as_dict()
        self.stats.sleeps += 1
        return dict(resident.asleep)

    async def wake(self, handle: Handle) -> dict[str, int]:
        resident = self._resident(handle)
        await self._delay(handle, "wake_time")
        resident.asleep = None
        self.stats.wakes += 1
        return dict(resident.memory)

    async def _delay(self, handle: Handle, option: str) -> None:
        delay = float(handle.spec.options.get(option, 0.0))
        if delay:
            await anyio.sleep(delay)

    async def observe(self) -> list[Observed]:
        if not self.reachable:
            from ..errors import ProviderUnavailable

            raise ProviderUnavailable(f"simulated runtime {self.name!r} unreachable", provider=self.name)
        return [
            Observed(
                target=t,
                memory=dict(r.asleep if r.asleep is not None else r.memory),
                owned=r.owned,
                tier=Tier.SLEEPING if r.asleep is not None else Tier.ACTIVE,
            )
            for t, r in self.resident.items()
        ]


__all__ = ["SimulatedProvider", "SimulatedSettings", "SimulatedStats"]
