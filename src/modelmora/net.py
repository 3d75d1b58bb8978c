"""Small network helpers shared by providers, the server and the test tools."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def expand(parts: Sequence[object], values: Mapping[str, str]) -> list[str]:
    """A command line with ``${PORT}``-style placeholders filled in, part by part."""
    out = []
    for part in parts:
        text = str(part)
        for key, value in values.items():
            text = text.replace("${" + key + "}", value)
        out.append(text)
    return out


__all__ = ["expand", "free_port"]
