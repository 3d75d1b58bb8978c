"""The built-in model set of ``modelmora bench --quick`` (completed with the torch provider)."""

from __future__ import annotations

from typing import Any

from .errors import ProviderUnavailable


def quick_config() -> tuple[dict[str, Any], list[str]]:
    raise ProviderUnavailable("the --quick set needs the torch provider, which is not installed yet")
