"""Memory probes and budgets per device.

Devices are named ``cuda:N`` and ``cpu``.  GPU memory is read through NVML
(``nvidia-ml-py``) when a driver is present, else through ``torch.cuda`` when torch is
installed with CUDA; host RAM through psutil.  Probes are blocking and run in worker
threads.  On a machine without a GPU nothing fails: GPU budgets come from config and the
snapshot says that GPU memory is not observed.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import psutil

from .config import Budget


@dataclass(frozen=True)
class DeviceMemory:
    """What a probe read off one device."""

    device: str
    total: int
    used: int
    free: int
    source: str  # "nvml", "torch", "psutil"
    name: str = ""
    processes: Mapping[int, int] = field(default_factory=dict)  # pid → bytes (NVML only)


class MemoryProbe:
    """Reads every device it can see; returns nothing for what it cannot."""

    source = "none"

    def read(self) -> list[DeviceMemory]:
        return []

    def close(self) -> None:
        """Release driver handles."""


class PsutilProbe(MemoryProbe):
    source = "psutil"

    def read(self) -> list[DeviceMemory]:
        vm = psutil.virtual_memory()
        return [DeviceMemory("cpu", vm.total, vm.total - vm.available, vm.available, "psutil", "RAM")]


class NvmlProbe(MemoryProbe):
    """NVML per GPU, with per-process usage; silently empty when there is no driver."""

    source = "nvml"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._failed = False

    def _init(self) -> Any:
        if self._nvml is None and not self._failed:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # no library, no driver, no GPU: all mean "not observed"
                self._failed = True
        return self._nvml

    def read(self) -> list[DeviceMemory]:
        with self._lock:
            nvml = self._init()
            if nvml is None:
                return []
            out = []
            try:
                for i in range(nvml.nvmlDeviceGetCount()):
                    h = nvml.nvmlDeviceGetHandleByIndex(i)
                    info = nvml.nvmlDeviceGetMemoryInfo(h)
                    name = nvml.nvmlDeviceGetName(h)
                    procs: dict[int, int] = {}
                    try:
                        for p in nvml.nvmlDeviceGetComputeRunningProcesses(h):
                            procs[int(p.pid)] = int(p.usedGpuMemory or 0)
                    except nvml.NVMLError:
                        pass
                    out.append(
                        DeviceMemory(
                            f"cuda:{i}", int(info.total), int(info.used), int(info.free), "nvml",
                            name.decode() if isinstance(name, bytes) else str(name), procs,
                        )
                    )  # fmt: skip
            except nvml.NVMLError:
                return []
            return out

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                with contextlib.suppress(Exception):
                    self._nvml.nvmlShutdown()
                self._nvml = None


_shared_nvml: NvmlProbe | None = None


def gpu_bytes_of(pids: Collection[int], probe: MemoryProbe | None = None) -> dict[str, int]:
    """GPU bytes per device (``cuda:N``, NVML's index) that the processes ``pids`` hold, from
    NVML's per-process accounting (``nvmlDeviceGetComputeRunningProcesses``); empty where
    there is no NVML or none of them is on a GPU.  Blocking (driver calls): call it off the
    event loop.  ``probe``: another source of the same readings (tests)."""
    global _shared_nvml
    if probe is None:
        probe = _shared_nvml = _shared_nvml or NvmlProbe()
    wanted = set(pids)
    out: dict[str, int] = {}
    for device in probe.read():
        used = sum(held for pid, held in device.processes.items() if pid in wanted)
        if used:
            out[device.device] = used
    return out


class TorchCudaProbe(MemoryProbe):
    """``torch.cuda.mem_get_info`` when torch is already imported with CUDA (never imports it)."""

    source = "torch"

    def read(self) -> list[DeviceMemory]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append(DeviceMemory(f"cuda:{i}", total, total - free, free, "torch"))
        return out


class SystemProbe(MemoryProbe):
    """NVML, else torch.cuda, for GPUs; psutil for RAM."""

    source = "system"

    def __init__(self) -> None:
        self.nvml = NvmlProbe()
        self.torch = TorchCudaProbe()
        self.ram = PsutilProbe()

    def read(self) -> list[DeviceMemory]:
        gpus = self.nvml.read() or self.torch.read()
        return [*gpus, *self.ram.read()]

    def close(self) -> None:
        self.nvml.close()


class StaticProbe(MemoryProbe):
    """Fixed readings: for tests and for dry runs of a machine you do not have."""

    source = "static"

    def __init__(self, devices: Mapping[str, int]):
        self.devices = dict(devices)

    def read(self) -> list[DeviceMemory]:
        return [DeviceMemory(d, t, 0, t, "static") for d, t in self.devices.items()]


@dataclass(frozen=True)
class DeviceStatus:
    device: str
    budget: int | None
    modelmora: int  # bytes held by our resident entries
    peak: int  # peak of ``modelmora`` since start
    observed: DeviceMemory | None


@dataclass(frozen=True)
class MemorySnapshot:
    devices: dict[str, DeviceStatus]
    gpu_observed: bool


DEFAULT_GPU_RESERVE = 1 << 30
"""Bytes kept free on each GPU whose budget modelmora works out itself, when the config
gives no ``reserve`` (1 GiB, as llama.cpp's ``--fit`` keeps by default)."""


@dataclass(frozen=True)
class ResolvedBudget:
    """One device's budget and where it came from (all sizes in bytes)."""

    device: str
    budget: int
    reserve: int  # bytes kept out of the budget
    source: str  # "config" (absolute), "percent" (of the measured total), "device" (total − reserve)


def resolve_budget_details(
    budgets: Mapping[str, Budget],
    reserve: int | None,
    readings: list[DeviceMemory],
    devices: Collection[str] | None = None,
) -> dict[str, ResolvedBudget]:
    """Bytes per device modelmora may fill, with their sources.

    Configured budgets first: absolute bytes as given, or a fraction of the measured total
    minus ``reserve`` (when one is configured).  Then every GPU the probe lists (NVML's
    ``cuda:N``) without one gets its total minus ``reserve`` (:data:`DEFAULT_GPU_RESERVE`
    when ``reserve`` is None).  Others' use is not taken off here: admission subtracts what
    other processes hold at each decision, from a fresh reading.  ``devices``: the only
    GPUs modelmora may use (None: all); RAM (``cpu``) is never excluded."""
    from .errors import ConfigError

    measured = {r.device: r for r in readings}
    out: dict[str, ResolvedBudget] = {}
    for device, budget in budgets.items():
        reading = measured.get(device)
        value = budget.resolve(reading.total if reading else None)
        if value is None:
            raise ConfigError(
                f"budgets.{device}: {budget} is relative but {device}'s memory cannot be measured "
                f"here; give an absolute size such as '15.5GB'"
            )
        if budget.fraction is not None:
            kept = reserve or 0
            out[device] = ResolvedBudget(device, value - kept, kept, "percent")
        else:
            out[device] = ResolvedBudget(device, value, 0, "config")
    for device, reading in measured.items():
        if not device.startswith("cuda:") or device in out:
            continue
        if devices is not None and device not in devices:
            continue
        kept = DEFAULT_GPU_RESERVE if reserve is None else reserve
        out[device] = ResolvedBudget(device, max(0, reading.total - kept), kept, "device")
    return out


def check_devices_present(devices: Collection[str] | None, readings: list[DeviceMemory]) -> None:
    """ConfigError when the config's ``devices`` names a GPU the probe does not list, on a
    machine where GPUs are read at all (without NVML the config is taken at its word)."""
    from .errors import ConfigError

    gpus = sorted((r.device for r in readings if r.device.startswith("cuda:")), key=lambda d: int(d[5:]))
    if devices is None or not gpus:
        return
    for device in devices:
        if device.startswith("cuda:") and device not in gpus:
            raise ConfigError(
                f"devices: {device} is not on this machine (the {readings[0].source} probe lists "
                f"{', '.join(gpus)})"
            )


def resolve_budgets(
    budgets: Mapping[str, Budget],
    reserve: int | None,
    readings: list[DeviceMemory],
    devices: Collection[str] | None = None,
) -> dict[str, int]:
    """Bytes per device: configured budgets (absolute, or a fraction of the measured total),
    and for every measured GPU without one, its total minus ``reserve`` (1 GiB when None);
    see :func:`resolve_budget_details`."""
    return {d: r.budget for d, r in resolve_budget_details(budgets, reserve, readings, devices).items()}


class MemoryMonitor:
    """Reads a probe in a worker thread and tracks our peak per device."""

    def __init__(self, probe: MemoryProbe | None = None):
        self.probe = probe or SystemProbe()
        self.peak: dict[str, int] = {}
        self._limiter = anyio.CapacityLimiter(1)

    async def read(self) -> list[DeviceMemory]:
        return await anyio.to_thread.run_sync(self.probe.read, limiter=self._limiter)

    def note_usage(self, used: Mapping[str, int]) -> None:
        for device, n in used.items():
            if n > self.peak.get(device, 0):
                self.peak[device] = n

    def snapshot(
        self, budgets: Mapping[str, int], used: Mapping[str, int], readings: list[DeviceMemory]
    ) -> MemorySnapshot:
        self.note_usage(used)
        measured = {r.device: r for r in readings}
        devices = sorted(set(budgets) | set(used) | set(measured))
        return MemorySnapshot(
            devices={
                d: DeviceStatus(d, budgets.get(d), used.get(d, 0), self.peak.get(d, 0), measured.get(d))
                for d in devices
            },
            gpu_observed=any(r.device.startswith("cuda:") for r in readings),
        )

    def close(self) -> None:
        self.probe.close()


__all__ = [
    "DEFAULT_GPU_RESERVE",
    "DeviceMemory",
    "DeviceStatus",
    "MemoryMonitor",
    "MemoryProbe",
    "MemorySnapshot",
    "NvmlProbe",
    "PsutilProbe",
    "ResolvedBudget",
    "StaticProbe",
    "SystemProbe",
    "TorchCudaProbe",
    "check_devices_present",
    "resolve_budget_details",
    "resolve_budgets",
]
