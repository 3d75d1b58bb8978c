"""The hardware inventory: every device modelmora sees or budgets, what it has, who holds it.

Pure data, built by :func:`hardware_view` from a probe's readings (NVML, torch.cuda,
psutil: :mod:`modelmora.memory`), the resolved budgets and the table's rows.  It is what
``ModelManager.hardware()``, ``GET /hardware`` and ``modelmora status --hardware`` show.
Every size is in bytes.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from .memory import DeviceMemory, ResolvedBudget


@dataclass(frozen=True)
class DeviceHardware:
    """One device (sizes in bytes).

    ``total``/``used``/``free``: the device as the probe read it (``source``: ``nvml``,
    ``torch``, ``psutil``, ...), None when it is not measured here.  ``used_by_others``:
    what the reading saw beyond modelmora's settled rows (other processes, and this
    process's leftovers of unloaded models).  ``used_by_modelmora``: what modelmora's rows
    are counted for (reservations of loads under way included).  ``budget``: what
    modelmora may fill (``budget_source``: ``config``, ``percent`` of the total, or
    ``device`` = total − ``reserve``); None = unlimited.  ``available``: what a load may
    still take now, once others' memory admission counts and modelmora's rows are taken
    off the budget.  ``allowed``: False for a GPU outside the config's ``devices``.
    ``processes``: pid → bytes, from NVML's per-process accounting."""

    device: str
    name: str
    source: str | None
    total: int | None
    used: int | None
    free: int | None
    used_by_others: int
    used_by_modelmora: int
    reserve: int
    budget: int | None
    budget_source: str | None
    available: int | None
    allowed: bool
    processes: Mapping[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["processes"] = {str(pid): n for pid, n in self.processes.items()}
        return data


@dataclass(frozen=True)
class Hardware:
    """Every device, GPUs first in index order, then RAM, then the rest (remote devices)."""

    devices: list[DeviceHardware]
    gpu_observed: bool  # some GPU was read (NVML or torch); False: GPU budgets come from config
    restricted_to: list[str] | None  # the config's ``devices``; None: every GPU

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu_observed": self.gpu_observed,
            "restricted_to": self.restricted_to,
            "devices": [d.to_dict() for d in self.devices],
        }


def _order(device: str) -> tuple[int, int, str]:
    gpu = re.fullmatch(r"cuda:(\d+)", device)
    if gpu:
        return (0, int(gpu.group(1)), device)
    return (1 if device == "cpu" else 2, 0, device)


def hardware_view(
    readings: list[DeviceMemory],
    budgets: Mapping[str, ResolvedBudget],
    used: Mapping[str, int],
    others: Mapping[str, int],
    counted: Mapping[str, int],
    devices: Collection[str] | None = None,
) -> Hardware:
    """The inventory (bytes throughout).  ``readings``: the probe's last reading;
    ``budgets``: :func:`~modelmora.memory.resolve_budget_details`; ``used``: modelmora's
    rows per device; ``others``: what the reading saw beyond them; ``counted``: what
    admission counts as others' (``Core.external``); ``devices``: the config's
    restriction (None: none)."""
    measured = {r.device: r for r in readings}
    allowed = None if devices is None else {*devices, "cpu"}
    out = []
    for device in sorted(set(measured) | set(budgets) | {d for d, n in used.items() if n}, key=_order):
        r = measured.get(device)
        b = budgets.get(device)
        mine = used.get(device, 0)
        available = None if b is None else max(0, b.budget - mine - counted.get(device, 0))
        out.append(
            DeviceHardware(
                device=device,
                name=r.name if r is not None else "",
                source=r.source if r is not None else None,
                total=r.total if r is not None else None,
                used=r.used if r is not None else None,
                free=r.free if r is not None else None,
                used_by_others=others.get(device, 0),
                used_by_modelmora=mine,
                reserve=b.reserve if b is not None else 0,
                budget=b.budget if b is not None else None,
                budget_source=b.source if b is not None else None,
                available=available,
                allowed=allowed is None or device in allowed or not _local(device),
                processes=dict(r.processes) if r is not None else {},
            )
        )
    return Hardware(
        out,
        gpu_observed=any(r.device.startswith("cuda:") for r in readings),
        restricted_to=None if devices is None else list(devices),
    )


def _local(device: str) -> bool:
    return device == "cpu" or re.fullmatch(r"cuda:\d+", device) is not None


__all__ = ["DeviceHardware", "Hardware", "hardware_view"]
