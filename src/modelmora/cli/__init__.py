"""The command-line applications: ``modelmora …`` (:mod:`.commands`, typer + rich) and what
only they use: the demo, the lifecycle benchmark and its report, the memory timeline PNG,
``bench --quick``'s built-in models, cache clearing, registry edits and the ``--url``
client for a running server.

``main`` and ``app`` load the commands on first use, so library code may import a helper
from here (``modelmora.cli.registry``) without pulling in typer and every command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .commands import app as app


def main() -> None:
    """The ``modelmora`` console script."""
    from .commands import main as run

    run()


def __getattr__(name: str) -> Any:
    if name == "app":
        from .commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "main"]
