"""Showing chains to people: a live step-by-step log, plan and result tables, JSON."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import events as ev
from ..core import ModelManager
from ..spec import format_size
from .executor import ChainObserver, ChainResult, Step, StepInfo
from .plan import PlannedStep, ResidencyPlan, plan_always_unload, plan_next_use

if TYPE_CHECKING:
    from ..cli.timeline import MemoryTimeline  # the demo's; only ever passed in


def _memory(memory: Mapping[str, int]) -> str:
    return ", ".join(f"{format_size(n)} {d}" for d, n in memory.items() if n) or "-"


def _excerpt(value: Any, width: int = 72) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


class ConsoleObserver(ChainObserver):
    """Prints each step and every load, unload and eviction as it happens."""

    def __init__(
        self,
        console: Console,
        manager: ModelManager,
        total: int,
        *,
        kinds: Mapping[str, str] | None = None,
        timeline: MemoryTimeline | None = None,
    ):
        self.console = console
        self.manager = manager
        self.total = total
        self.kinds = dict(kinds or {})
        self.timeline = timeline
        self.planned: PlannedStep | None = None
        self.plan: ResidencyPlan | None = None
        self.shown: set[str] = set()  # errors printed already: said once, then referred to
        manager.events.subscribe(self._on_event)

    def _say(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def _usage(self) -> str:
        return _memory(self.manager.usage())

    def _on_event(self, e: ev.Event) -> None:
        kind = f" [dim]({self.kinds[e.model]})[/]" if e.model in self.kinds else ""
        if isinstance(e, ev.Loaded):
            self._say(
                f"    [green]load[/]    {e.model}{kind}: measured {_memory(e.memory)} in {e.duration_s:.2f}s"
                f"  [dim]· in use {self._usage()}[/]"
            )
        elif isinstance(e, ev.Evicted):
            self._say(f"    [yellow]evict[/]   {e.model} to make room for {e.for_model} ({escape(e.reason)})")
        elif isinstance(e, ev.Unloaded):
            reason = e.reason
            if self.planned is not None and e.model in self.planned.unload_after:
                reason = "plan: " + (
                    "not used again" if self._last_use(e.model) else "dropped until its next use"
                )
            self._say(
                f"    [magenta]unload[/]  {e.model}: freed {_memory(e.freed)} ({reason})"
                f"  [dim]· in use {self._usage()}[/]"
            )
        elif isinstance(e, ev.LoadFailed):
            self._say(f"    [red]failed[/]  {e.model}: {escape(str(e.error))}")
            self.shown.add(str(e.error))

    def _last_use(self, model: str) -> bool:
        return self.planned is not None and all(
            s.model != model for s in (self.plan.steps[self.planned.index + 1 :] if self.plan else ())
        )

    def plan_ready(self, plan: ResidencyPlan) -> None:
        self.plan = plan

    def step_started(self, index: int, step: Step, planned: PlannedStep | None) -> None:
        self.planned = planned
        what = step.model or "(no model)"
        note = ""
        if planned is not None and step.model:
            note = " · plan: " + ("load" if planned.load else "reuse (still resident)")
            if planned.prefetch:
                note += f", prefetch {planned.prefetch} meanwhile"
        self._say(f"[bold][{index + 1}/{self.total}] {step.label}[/] → {what}{note}")
        if self.timeline is not None:
            self.timeline.mark(f"{index + 1}. {step.label}")

    def step_finished(self, info: StepInfo) -> None:
        if info.error is not None and info.error in self.shown:
            self._say(f"    [red]error[/]   the step stopped: {info.model} did not load (above)")
        elif info.error is not None:
            self._say(f"    [red]error[/]   {escape(str(info.error))}")
            self.shown.add(info.error)
        else:
            self._say(f"    [cyan]output[/]  {escape(_excerpt(info.output))}  [dim]({info.run_s:.2f}s)[/]")


def render_plan(console: Console, plan: ResidencyPlan) -> None:
    table = Table(title=f"Residency plan ({plan.method_text})", title_justify="left")
    for col in ("#", "model", "action", "resident during the step", "prefetch", "unload after"):
        table.add_column(col)
    for s in plan.steps:
        action = "-" if s.model is None else ("load" if s.load else "reuse")
        table.add_row(
            str(s.index + 1), s.model or "-", action, ", ".join(s.resident) or "-",
            s.prefetch or "-", ", ".join(s.unload_after) or "-",
        )  # fmt: skip
    console.print(table)
    models = plan.models
    unknown = [n for n, m in models.items() if not any(m.memory.values())]
    if unknown:
        console.print(
            f"[yellow]size unknown[/] for {', '.join(unknown)} (no estimate in the registry and the "
            "runtime did not say): the plan counts them as free; admission still checks measured sizes",
            highlight=False,
        )
    sequence = [s.model for s in plan.steps]
    seed, always = plan_next_use(sequence, models), plan_always_unload(sequence, models)
    console.print(
        f"{plan.loads} loads ({plan.load_time:.1f}s expected) within {plan.capacity_text}; the keep-only-if-the-next-"
        f"step-reuses rule: {seed.loads} loads ({seed.load_time:.1f}s); always unload: {always.loads} "
        f"loads ({always.load_time:.1f}s)",
        highlight=False,
    )


def render_result(
    console: Console,
    result: ChainResult,
    *,
    kinds: Mapping[str, str] | None = None,
    shown: Collection[str] = (),
) -> None:
    """The steps table and the verdict; an error in ``shown`` (printed already, e.g. by a
    :class:`ConsoleObserver`) is referred to rather than repeated."""
    kinds = kinds or {}
    table = Table(title="Steps", title_justify="left")
    for col in ("#", "step", "model", "came from", "load s", "run s", "unloaded after"):
        table.add_column(col)
    for s in result.steps:
        came = (
            "-" if s.model is None
            else "[red]failed to load[/]" if s.load_failed
            else "prefetch" if s.prefetched else "load" if s.loaded else "reuse"
        )  # fmt: skip
        kind = kinds.get(s.model or "")
        model = (s.model or "-") + (f" ({kind})" if kind else "")
        table.add_row(
            str(s.index + 1), s.step, model, came, f"{s.load_s:.2f}", f"{s.run_s:.2f}",
            ", ".join(s.unloaded) or ("[red]failed[/]" if s.error else "-"),
        )  # fmt: skip
    console.print(table)
    why = " (the error is above)" if result.reason in shown else f": {result.reason}"
    state = "completed" if result.ok else f"broken at step {(result.broken_at or 0) + 1}{why}"
    console.print(
        f"chain {escape(state)} in {result.duration_s:.2f}s with {result.loads} loads", highlight=False
    )


def result_to_dict(result: ChainResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "output": result.output
        if isinstance(result.output, str | int | float | bool | None)
        else str(result.output),
        "broken_at": result.broken_at,
        "reason": result.reason,
        "duration_s": round(result.duration_s, 4),
        "loads": result.loads,
        "steps": [
            {
                "index": s.index,
                "step": s.step,
                "model": s.model,
                "loaded": s.loaded,
                "prefetched": s.prefetched,
                "load_failed": s.load_failed,
                "load_s": round(s.load_s, 4),
                "run_s": round(s.run_s, 4),
                "unloaded": list(s.unloaded),
                "error": s.error,
                "output": s.output
                if isinstance(s.output, str | int | float | bool | None)
                else str(s.output),
            }
            for s in result.steps
        ],
        "plan": plan_to_dict(result.plan) if result.plan else None,
    }


def plan_to_dict(plan: ResidencyPlan) -> dict[str, Any]:
    return {
        "method": plan.method,
        "method_text": plan.method_text,
        "lower_bound_s": plan.lower_bound,
        "gap": None if math.isinf(plan.gap) else plan.gap,
        "search_s": round(plan.search_s, 4),
        "loads": plan.loads,
        "load_time_s": plan.load_time,
        "capacity": dict(plan.capacity),
        "steps": [
            {
                "index": s.index,
                "model": s.model,
                "load": s.load,
                "resident": list(s.resident),
                "prefetch": s.prefetch,
                "unload_after": list(s.unload_after),
            }
            for s in plan.steps
        ],
    }


__all__ = ["ConsoleObserver", "plan_to_dict", "render_plan", "render_result", "result_to_dict"]
