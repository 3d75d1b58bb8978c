"""A memory timeline: what each model held on one device, sampled at every lifecycle event,
with the process's RSS beside it, and a PNG of it (matplotlib, the ``bench`` extra).

The per-model figures are the manager's measurements (what each load measured), so the
plot shows what the budget decisions were made on; RSS shows what the OS saw meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psutil

from .. import events as ev
from ..core import ModelManager


@dataclass(frozen=True)
class Sample:
    t: float
    models: dict[str, int]
    rss: int
    label: str | None = None


@dataclass
class MemoryTimeline:
    manager: ModelManager
    device: str = "cpu"
    samples: list[Sample] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)  # (t, text): step boundaries
    _t0: float = field(default_factory=time.perf_counter)
    _proc: Any = field(default_factory=psutil.Process, repr=False)

    def attach(self) -> MemoryTimeline:
        self.manager.events.subscribe(self._on_event)
        self.sample("start")
        return self

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def sample(self, label: str | None = None) -> None:
        models = {
            e.name: e.memory.get(self.device, 0) for e in self.manager.entries() if e.memory.get(self.device)
        }
        self.samples.append(Sample(self.now(), models, int(self._proc.memory_info().rss), label))

    def mark(self, text: str) -> None:
        self.marks.append((self.now(), text))

    def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.Loaded | ev.Unloaded | ev.Evicted | ev.Slept | ev.Woke):
            self.sample(f"{type(event).__name__.lower()} {event.model}")

    async def poll(
        self, interval: float = 0.1, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Sample every ``interval`` seconds until cancelled (RSS moves between events too)."""
        task_status.started()
        while True:
            await anyio.sleep(interval)
            self.sample()

    def peak(self) -> int:
        return max((sum(s.models.values()) for s in self.samples), default=0)

    def plot(self, path: str | Path, *, budget: int | None = None, title: str = "Memory timeline") -> Path:
        """Step plot of per-model memory (stacked) and process RSS; returns the path written."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        names = list(dict.fromkeys(n for s in self.samples for n in s.models))
        t = [s.t for s in self.samples]
        mb = 1e6
        fig, ax = plt.subplots(figsize=(11, 4.8), dpi=110)
        stacks = [[s.models.get(n, 0) / mb for s in self.samples] for n in names]
        if names:
            ax.stackplot(t, *stacks, labels=names, step="post", alpha=0.85)
        base = self.samples[0].rss if self.samples else 0
        ax.plot(t, [(s.rss - base) / mb for s in self.samples], color="black", lw=1, drawstyle="steps-post",
                label="process RSS − RSS at start")  # fmt: skip
        if budget is not None:
            ax.axhline(budget / mb, color="red", ls="--", lw=1, label=f"{self.device} budget")
        for when, text in self.marks:
            ax.axvline(when, color="grey", lw=0.6, ls=":")
            ax.annotate(
                text, (when, ax.get_ylim()[1]), rotation=90, va="top", ha="right", fontsize=7, color="grey"
            )
        ax.set_xlabel("seconds")
        ax.set_ylabel(f"MB on {self.device}")
        ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        tmp.replace(path)  # no half-written PNG if the run dies mid-save
        return path


__all__ = ["MemoryTimeline", "Sample"]
