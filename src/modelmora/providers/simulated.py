"""A runtime that only pretends: load/unload costs and sizes come from the spec.

Use it to dry-run a configuration (``modelmora plan``) and to test code built on the
manager without a GPU.  It is also the fake at the seam for modelmora's own tests, so it
has hooks to make the runtime misbehave: failing or hanging loads, models that vanish
behind the manager's back, models that someone else loaded.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import filelock
from pydantic import Field

from ..errors import LoadFailed, ModelMoraError
from ..footprint import Footprint
from ..spec import Duration, ModelSpec
from .base import Capabilities, Handle, Observed, Provider, ProviderSettings, Tier


class SimulatedSettings(ProviderSettings):
    load_time: Duration = 0.0
    unload_time: Duration = 0.0
    state_file: str | None = Field(
        None,
        description="Keep what is resident in this JSON file, so separate processes (CLI commands) "
        "see one simulated runtime, as they would a real one.",
    )


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
        self.state_file = Path(self.settings.state_file).expanduser() if self.settings.state_file else None
        self.stats = SimulatedStats()
        self._fail_next: dict[str, list[BaseException]] = {}
        self._hang: set[str] = set()
        self.reachable = True

    # -- state shared through a file -----------------------------------------------------

    @contextlib.contextmanager
    def _state(self, *, write: bool = True) -> Iterator[dict[str, _Resident]]:
        """``resident``, re-read from the state file and written back after the block, under
        a file lock (without a state file: just ``resident``)."""
        if self.state_file is None:
            yield self.resident
            return
        if not write:  # the writes are atomic: a plain read sees a whole file
            self.resident = self._read_state()
            yield self.resident
            return
        from ..cli.registry import atomic_write

        lock = filelock.FileLock(self.state_file.with_name(f".{self.state_file.name}.lock"), timeout=30)
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            with lock:
                self.resident = self._read_state()
                yield self.resident
                models = {
                    t: {"memory": r.memory, "owned": r.owned, "asleep": r.asleep}
                    for t, r in self.resident.items()
                }
                atomic_write(self.state_file, json.dumps({"version": 1, "models": models}, indent=1) + "\n")
        except (OSError, filelock.Timeout) as exc:
            raise ModelMoraError(
                f"simulated runtime {self.name!r}: cannot use its state file {self.state_file} ({exc})",
                provider=self.name,
            ) from None

    def _read_state(self) -> dict[str, _Resident]:
        assert self.state_file is not None
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            return {
                str(t): _Resident(
                    {str(d): int(n) for d, n in r["memory"].items()},
                    bool(r.get("owned", True)),
                    None if r.get("asleep") is None else {str(d): int(n) for d, n in r["asleep"].items()},
                )
                for t, r in data["models"].items()
            }
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError):
            return {}  # a damaged file is an empty runtime, as after a reboot

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
        with self._state() as resident:
            resident.pop(target, None)

    def preload(self, target: str, memory: dict[str, int], *, owned: bool = False) -> None:
        """Something else loaded this model before the manager started."""
        with self._state() as resident:
            resident[target] = _Resident(dict(memory), owned)

    # -- provider -----------------------------------------------------------------------

    async def load(self, spec: ModelSpec) -> Handle:
        if not self.reachable:
            from ..errors import RuntimeUnreachable

            raise RuntimeUnreachable(f"simulated runtime {self.name!r} unreachable", provider=self.name)
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
            with self._state() as resident:
                resident[target] = _Resident(memory)
            return Handle(spec=spec, provider=self.name, memory=dict(memory), _obj=f"<simulated {target}>")
        finally:
            self.stats.loading.discard(target)

    async def unload(self, handle: Handle) -> dict[str, int]:
        delay = float(handle.spec.options.get("unload_time", self.settings.unload_time))
        if delay:
            await anyio.sleep(delay)
        with self._state() as resident:
            gone = resident.pop(handle.target, None)
        self.stats.unloads += 1
        handle.close()
        return dict(gone.memory) if gone else {}

    def _resident(self, handle: Handle) -> _Resident:
        with self._state(write=False) as models:
            resident = models.get(handle.target)
        if resident is None:
            raise LoadFailed(
                f"simulated runtime no longer has {handle.target!r}", model=handle.name, provider=self.name
            )
        return resident

    async def sleep(self, handle: Handle, level: int | None = None) -> dict[str, int]:
        """Weights to host RAM: GPU memory drops to nothing, RAM takes what the GPU held."""
        self._resident(handle)
        await self._delay(handle, "sleep_time")
        with self._state() as models:
            resident = models.get(handle.target) or _Resident(dict(handle.memory))
            resident.asleep = Footprint(resident.memory).parked().as_dict()
            models[handle.target] = resident
        self.stats.sleeps += 1
        return dict(resident.asleep)

    async def wake(self, handle: Handle) -> dict[str, int]:
        self._resident(handle)
        await self._delay(handle, "wake_time")
        with self._state() as models:
            resident = models.get(handle.target) or _Resident(dict(handle.memory))
            resident.asleep = None
            models[handle.target] = resident
        self.stats.wakes += 1
        return dict(resident.memory)

    async def _delay(self, handle: Handle, option: str) -> None:
        delay = float(handle.spec.options.get(option, 0.0))
        if delay:
            await anyio.sleep(delay)

    async def observe(self) -> list[Observed]:
        if not self.reachable:
            from ..errors import RuntimeUnreachable

            raise RuntimeUnreachable(f"simulated runtime {self.name!r} unreachable", provider=self.name)
        with self._state(write=False):
            pass  # re-read what other processes did
        return [
            Observed(
                target=t,
                memory=dict(r.asleep if r.asleep is not None else r.memory),
                owned=r.owned,
                tier=Tier.SLEEPING if r.asleep is not None else Tier.ACTIVE,
                awake=dict(r.memory) if r.asleep is not None else {},
            )
            for t, r in self.resident.items()
        ]

    async def serves(self, spec: ModelSpec) -> frozenset[str]:
        return frozenset()  # it loads and unloads, but there is no model to answer


__all__ = ["SimulatedProvider", "SimulatedSettings", "SimulatedStats"]
