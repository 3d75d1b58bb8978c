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

# The libraries, then what they import lazily on a first load (transformers resolves its
# classes on first use): each worker would otherwise pay for these again.
MODULES = (
    "torch",
    "transformers",
    "sentence_transformers",
    "sentence_transformers.models",
    "transformers.modeling_utils",
    "transformers.modeling_layers",
    "transformers.masking_utils",
    "transformers.generation.utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.bert.modeling_bert",  # the usual sentence-embedding encoder
    "transformers.models.bert.tokenization_bert",
)
for _name in MODULES:
    with contextlib.suppress(Exception):  # missing extras just make workers import on demand
        importlib.import_module(_name)


def _warm_transformers() -> None:
    """One-off work transformers does on its first load in a process (building the table of
    checkpoint conversions compiles ~1,000 regular expressions: 0.4 s), done once here."""
    conversion = sys.modules.get("transformers.conversion_mapping")
    if conversion is None:
        with contextlib.suppress(Exception):
            conversion = importlib.import_module("transformers.conversion_mapping")
    build = getattr(conversion, "get_checkpoint_conversion_mapping", None)
    if build is not None:
        with contextlib.suppress(Exception):
            build("bert")


_warm_transformers()

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
