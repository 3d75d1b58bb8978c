"""Imported once by the torch provider's fork server (see :mod:`.torch_pool`), so every
isolated worker it forks starts with torch, transformers, sentence-transformers and the
loaders already in memory and only pays for reading its weights.

Fork safety: this runs in a fresh interpreter that has started no thread and touched no
CUDA device; importing these libraries does neither (CUDA initialises lazily, on first
use, which happens in the forked worker).  The checks below say so loudly if a future
version of a library breaks that rule, because a fork after it would be unsafe.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading

for _name in ("torch", "transformers", "sentence_transformers"):
    with contextlib.suppress(Exception):  # missing extras just make workers import on demand
        importlib.import_module(_name)

from . import torch_loaders, torch_worker  # noqa: E402,F401

if threading.active_count() > 1:
    print(
        f"modelmora fork server: {threading.active_count()} threads after the imports; forked "
        "workers may inherit a held lock",
        file=sys.stderr,
    )
_torch = sys.modules.get("torch")
if _torch is not None and _torch.cuda.is_initialized():
    print(
        "modelmora fork server: CUDA initialised by an import; forked workers cannot use it", file=sys.stderr
    )
