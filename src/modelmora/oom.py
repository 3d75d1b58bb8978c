"""Recognising a load that ran out of memory, whatever runtime reported it.

:func:`out_of_memory` reads an exception (and the exceptions it was raised from) and
answers an :class:`~modelmora.errors.OutOfMemory` when it is one, with what the message
says the failed allocation asked for (``needed``), what the model needs in all
(``required``) and what was free (``free``), in bytes, where it says so:

* torch: ``torch.cuda.OutOfMemoryError`` / ``torch.OutOfMemoryError`` — "CUDA out of
  memory. Tried to allocate 2.00 GiB ... of which 1.50 GiB is free";
* llama.cpp (llama-server's log): "failed to allocate CUDA0 buffer of size 123456",
  "allocating 1234.56 MiB on device 0: cudaMalloc failed: out of memory";
* vLLM: "No available memory for the cache blocks";
* Ollama: "model requires more system memory (12.3 GiB) than is available (8.0 GiB)",
  "out of memory";
* anything else saying "out of memory" / "OutOfMemory".

The loader uses it to raise the model's estimate, evict and retry once
(:mod:`modelmora.core.loading`).
"""

from __future__ import annotations

import re

from .errors import OutOfMemory

_UNITS = {
    "": 1,
    "b": 1,
    "bytes": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = r"([0-9]+(?:\.[0-9]+)?)\s*(bytes|[kmgt]i?b|b)?"

_SIGNS = (
    re.compile(r"out of memory", re.I),
    re.compile(r"outofmemory", re.I),
    re.compile(r"failed to allocate", re.I),
    re.compile(r"cudaMalloc failed", re.I),
    re.compile(r"no available memory for the cache blocks", re.I),
    re.compile(r"requires more (?:system )?memory", re.I),
    re.compile(r"ErrorOutOfDeviceMemory", re.I),
)
_NEEDED = (
    re.compile(r"tried to allocate " + _SIZE, re.I),  # torch
    re.compile(r"buffer of size " + _SIZE, re.I),  # llama.cpp
    re.compile(r"allocating " + _SIZE + r" on device", re.I),  # ggml
)
_REQUIRED = (re.compile(r"requires more (?:system )?memory \(" + _SIZE + r"\)", re.I),)  # Ollama: in all
_FREE = (
    re.compile(r"of which " + _SIZE + r" is free", re.I),  # torch
    re.compile(r"than is available \(" + _SIZE + r"\)", re.I),  # Ollama
)


def _bytes(match: re.Match[str]) -> int:
    number, unit = match.group(1), (match.group(2) or "").lower()
    return int(float(number) * _UNITS.get(unit, 1))


def _find(patterns: tuple[re.Pattern[str], ...], text: str) -> int | None:
    for pattern in patterns:
        match = pattern.search(text)
        if match:
            return _bytes(match)
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def out_of_memory(exc: BaseException) -> OutOfMemory | None:
    """``exc`` as an :class:`OutOfMemory` when it (or what it was raised from) says the
    runtime ran out of memory; ``None`` otherwise.  An ``OutOfMemory`` a provider raised
    itself is returned as it is."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, OutOfMemory):
            return e
    text = "\n".join(f"{type(e).__name__}: {e}" for e in chain)
    is_oom = any(type(e).__name__ == "OutOfMemoryError" for e in chain) or any(s.search(text) for s in _SIGNS)
    if not is_oom:
        return None
    model = getattr(exc, "model", None)
    provider = getattr(exc, "provider", None)
    error = OutOfMemory(
        str(exc) or type(exc).__name__,
        model=model if isinstance(model, str) else None,
        provider=provider if isinstance(provider, str) else None,
        needed=_find(_NEEDED, text),
        free=_find(_FREE, text),
        required=_find(_REQUIRED, text),
    )
    error.__cause__ = exc
    return error


__all__ = ["out_of_memory"]
