"""Building model objects for the torch provider: the part that runs in a worker thread
or in an isolated worker process.  torch and friends are imported only here, lazily."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import importlib
import os
import re
import sys
from typing import Any

from ..errors import ConfigError, LoadFailed, ModelNotFound
from ..extras import install_hint

KINDS = ("transformers", "sentence-transformers", "diffusers", "factory")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def kind_of(target: str, options: dict[str, Any]) -> str:
    kind = str(options.get("kind") or ("factory" if _FACTORY.fullmatch(target) else "transformers"))
    if kind not in KINDS:
        raise ConfigError(f"options.kind: {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def resolve_device(device: str) -> str:
    if device == "auto":
        torch = _torch()
        return "cuda:0" if torch is not None and torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch = _torch()
        if torch is None or not torch.cuda.is_available():
            raise LoadFailed(
                f"device {device!r} requested but this torch has no CUDA; use device: auto or cpu"
            )
    return device


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def load_object(name: str, target: str, device: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Return (model object, extras such as the tokenizer).  Blocking: call from a worker."""
    kind = kind_of(target, options)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no progress bars inside a server or CLI
    if kind != "factory":
        with contextlib.suppress(ImportError):
            import transformers

            transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    dtype = options.get("dtype")
    local_only = bool(options.get("local_files_only", offline()))
    try:
        if kind == "factory":
            module_name, _, attr = target.partition(":")
            factory = importlib.import_module(module_name)
            for part in attr.split("."):
                factory = getattr(factory, part)
            obj = factory(**dict(options.get("kwargs", {})))  # type: ignore[operator]
            if device != "cpu" and hasattr(obj, "to"):
                obj = obj.to(device) or obj
            return obj, {}
        if kind == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            return SentenceTransformer(target, device=device, local_files_only=local_only), {}
        torch = _torch()
        torch_dtype = getattr(torch, str(dtype)) if dtype and torch is not None else None
        if kind == "diffusers":
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(
                target, torch_dtype=torch_dtype, local_files_only=local_only
            )
            return pipe.to(device), {}
        import transformers

        auto = getattr(transformers, str(options.get("auto_class", "AutoModel")))
        kwargs: dict[str, Any] = {"local_files_only": local_only}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        model = auto.from_pretrained(target, **kwargs).to(device)
        model.eval()
        extras: dict[str, Any] = {}
        if options.get("tokenizer", True):
            with contextlib.suppress(OSError, ValueError):  # a model without a tokenizer is still a model
                extras["tokenizer"] = transformers.AutoTokenizer.from_pretrained(
                    target, local_files_only=local_only
                )
        return model, extras
    except (OSError, FileNotFoundError) as exc:
        where = "locally (offline: HF_HUB_OFFLINE=1)" if local_only else "locally or on the hub"
        raise ModelNotFound(
            f"{name}: cannot find {target!r} {where}: {_first_line(exc)}", model=name
        ) from exc
    except ImportError as exc:
        raise LoadFailed(
            f"{name}: {kind} models need {exc.name or exc}; {install_hint('torch', missing=exc.name)}",
            model=name,
        ) from exc


def infer_once(obj: Any, extras: dict[str, Any], text: str = "hello world") -> bool:
    """One tiny inference through whatever ``obj`` offers (blocking): a causal LM
    generates one token, another model with a tokenizer runs a forward pass, a sentence
    encoder encodes, a callable is called.  False when it offers none of these."""
    tokenizer = extras.get("tokenizer")
    if tokenizer is not None and callable(obj):
        inputs = tokenizer(text, return_tensors="pt")
        with contextlib.suppress(AttributeError, TypeError):
            inputs = inputs.to(next(obj.parameters()).device)
        if hasattr(obj, "generate"):
            obj.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        else:
            obj(**inputs)
    elif hasattr(obj, "encode"):
        obj.encode([text])
    elif callable(obj):
        obj(text)
    else:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def footprint(obj: Any) -> int:
    """Bytes of parameters and buffers of a torch module or pipeline (0 when not torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    modules = []
    if isinstance(obj, torch.nn.Module):
        modules.append(obj)
    else:
        components = getattr(obj, "components", None)
        if isinstance(components, dict):
            modules += [m for m in components.values() if isinstance(m, torch.nn.Module)]
        model = getattr(obj, "model", None)
        if isinstance(model, torch.nn.Module):
            modules.append(model)
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def move(obj: Any, device: str) -> None:
    """Move a module or pipeline between devices (the warm tier)."""
    if hasattr(obj, "to"):
        obj.to(device)


def release_memory() -> None:
    """Everything that makes freed tensors' memory visible as free again."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    trim_malloc()


def trim_malloc() -> None:
    """glibc keeps freed heap pages; malloc_trim(0) returns them to the OS."""
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def cuda_allocated(device: str) -> int:
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return 0
    return int(torch.cuda.memory_allocated(device))
