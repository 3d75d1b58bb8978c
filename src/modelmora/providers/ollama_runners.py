"""Where Ollama put a model's runner (issue 23, item 3): Ollama places its runners itself
(``server/sched.go``: the single best GPU unless the model must spread), so modelmora
cannot choose the device; it reads where the runner landed instead.

A runner is a child process of ``ollama serve`` (``ollama runner --model <blob> ...``,
``llm/server.go``).  The runner of a model is the one whose command line names the model's
weights blob (``/api/show``'s ``modelfile``: ``FROM .../blobs/sha256-…``), else the one
that appeared during the load.  NVML's per-process accounting
(``nvmlDeviceGetComputeRunningProcesses``, read through a
:class:`~modelmora.memory.MemoryProbe`) then says how many bytes it and its children hold
on each GPU.  Only an Ollama on this machine can be looked at; for one elsewhere, or where
there is no NVML, :meth:`RunnerLocator.locate` answers ``None`` and the provider keeps
counting the VRAM on its configured ``device``.

Both sources sit behind small interfaces (:class:`ProcessTable`, ``MemoryProbe``) so the
logic is tested with a fake process table and a fake NVML reading.  All calls block
(``/proc``, driver calls): run them in a worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import psutil

from ..memory import MemoryProbe, gpu_bytes_of
from ..spec import format_size

BLOB_RE = re.compile(r"sha256[-:]([0-9a-f]{64})")


class ProcessTable(Protocol):
    """The processes of this machine, as far as runner placement needs them."""

    def servers(self) -> list[int]:
        """Pids of ``ollama serve`` processes."""
        ...

    def descendants(self, pid: int) -> dict[int, tuple[str, ...]]:
        """Every process below ``pid``: pid → its command line."""
        ...


class PsutilProcessTable:
    """:class:`ProcessTable` from psutil (``/proc`` on Linux)."""

    def servers(self) -> list[int]:
        found = []
        for p in psutil.process_iter(["pid", "name", "cmdline"]):
            cmd = p.info.get("cmdline") or []
            name = str(p.info.get("name") or "")
            if "ollama" in name.lower() and "serve" in cmd:
                found.append(int(p.info["pid"]))
        return found

    def descendants(self, pid: int) -> dict[int, tuple[str, ...]]:
        out: dict[int, tuple[str, ...]] = {}
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return out
        for child in children:
            try:
                out[child.pid] = tuple(child.cmdline())
            except psutil.Error:
                continue  # gone, or not ours to read
        return out


@dataclass(frozen=True)
class Landed:
    """Where a runner landed: GPU bytes per device NVML counts for ``pids`` (the runner
    and its children), and how it was recognised."""

    memory: Mapping[str, int]
    pids: tuple[int, ...]
    how: str  # "its weights blob" or "started during the load"

    def describe(self) -> str:
        where = ", ".join(f"{d} {format_size(n)}" for d, n in sorted(self.memory.items()))
        pids = ", ".join(map(str, self.pids))
        return (
            f"Ollama placed it: its runner (pid {pids}, {self.how}) holds {where} by NVML per-process bytes"
        )

    def split(self, vram: int) -> dict[str, int]:
        """``vram`` bytes (what ``/api/ps`` counts on the GPU) shared over the devices the
        runner landed on in NVML's proportions (largest remainder, so the parts sum to
        ``vram``)."""
        total = sum(self.memory.values())
        if not total or vram <= 0:
            return {}
        devices = sorted(self.memory)
        parts = {d: vram * self.memory[d] // total for d in devices}
        short = vram - sum(parts.values())
        by_rest = sorted(devices, key=lambda d: -(vram * self.memory[d] % total))
        for d in by_rest[:short]:
            parts[d] += 1
        return {d: n for d, n in parts.items() if n}


def blob_digests(show: Mapping[str, object]) -> frozenset[str]:
    """The sha256 digests of the weight blobs ``/api/show`` names in its ``modelfile``
    (``FROM /root/.ollama/models/blobs/sha256-<64 hex>``); empty when it names none."""
    modelfile = str(show.get("modelfile") or "")
    return frozenset(
        m.group(1)
        for line in modelfile.splitlines()
        if line.startswith("FROM")
        for m in BLOB_RE.finditer(line)
    )


class RunnerLocator:
    """Finds the runner of a model under the ``ollama serve`` processes of this machine and
    reads where it holds memory.  ``processes`` and ``probe`` default to psutil and NVML."""

    def __init__(self, processes: ProcessTable | None = None, probe: MemoryProbe | None = None):
        self.processes: ProcessTable = processes or PsutilProcessTable()
        self.probe = probe

    def runners(self) -> dict[int, tuple[str, ...]]:
        """Pid → command line of every process below every ``ollama serve``."""
        out: dict[int, tuple[str, ...]] = {}
        for server in self.processes.servers():
            out.update(self.processes.descendants(server))
        return out

    def locate(self, before: Collection[int], blobs: Collection[str]) -> Landed | None:
        """Where the runner of a model landed: the runners whose command line names one of
        ``blobs`` (its weights' sha256), else those not among ``before`` (the pids seen
        before the load), with their children; ``None`` when neither finds one, or NVML
        sees none of them on a GPU (a CPU-only runner, no NVML)."""
        running = self.runners()
        mine = [pid for pid, cmd in running.items() if blobs and _names_blob(cmd, blobs)]
        how = "its weights blob"
        if not mine:
            mine = [pid for pid, cmd in running.items() if pid not in before and _is_runner(cmd)]
            how = "started during the load"
        if not mine:
            return None
        family = {*mine}
        for pid in mine:
            family.update(self.processes.descendants(pid))
        memory = gpu_bytes_of(family, self.probe)
        if not memory:
            return None
        return Landed(memory=memory, pids=tuple(sorted(mine)), how=how)


def _names_blob(cmd: Sequence[str], blobs: Collection[str]) -> bool:
    return any(m.group(1) in blobs for arg in cmd for m in BLOB_RE.finditer(arg))


def _is_runner(cmd: Sequence[str]) -> bool:
    """``ollama runner ...`` (0.2 and later) or the older ``ollama_llama_server``."""
    return "runner" in cmd[1:2] or any("ollama_llama_server" in a for a in cmd[:1])


__all__ = ["Landed", "ProcessTable", "PsutilProcessTable", "RunnerLocator", "blob_digests"]
