"""``modelmora load``'s progress: a bar with the time left, from the model's measured load
time (see :mod:`modelmora.server.progress` for the estimate a server gives).

On a terminal a rich progress bar fills as the load runs: elapsed seconds over the expected
ones, held at 99 % until the load has really finished, with "about N s left"; a model never
measured and without a ``load_time`` gets a spinner and the seconds so far.  In logs and CI
(stderr not a terminal) one line says what is expected: the last measured load time, else
the registry's ``load_time``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

from ..spec import format_duration


def eta_text(elapsed: float, expected: float | None) -> str:
    """``40 % (about 12 s left)`` from seconds elapsed and expected; ``3 s so far`` when
    nothing predicts it; ``finishing (took longer than the 8 s measured)`` past it."""
    if expected is None or expected <= 0:
        return f"{elapsed:.0f} s so far, no load time measured yet"
    if elapsed >= expected:
        return f"99 % (took longer than the {format_duration(expected)} measured)"
    return f"{min(99, int(100 * elapsed / expected))} % (about {math.ceil(expected - elapsed)} s left)"


@contextlib.contextmanager
def load_bar(console: Console, message: str, expected: float | None) -> Iterator[Callable[[float], None]]:
    """Show the progress of a load that is expected to take ``expected`` seconds (None:
    unknown); yields ``update(elapsed_s)``."""
    if not console.is_terminal:
        known = (
            f"expected to take about {format_duration(expected)}" if expected else "no load time measured yet"
        )
        console.print(f"{message} ({known}) …", highlight=False, soft_wrap=True)
        yield lambda elapsed: None
        return
    columns = ((SpinnerColumn(),) if not expected else (BarColumn(),)) + (
        TextColumn("{task.description}"),
        TextColumn("[dim]{task.fields[eta]}"),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        total = expected if expected else None
        task = bar.add_task(message, total=total, eta=eta_text(0.0, expected))

        def update(elapsed: float) -> None:
            done = min(elapsed, 0.99 * expected) if expected else elapsed
            bar.update(task, completed=done, eta=eta_text(elapsed, expected))

        yield update


__all__ = ["eta_text", "load_bar"]
