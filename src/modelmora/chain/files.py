"""Chains written as YAML, for ``modelmora run chain.yaml``.

name: analysis
config: ../../configs/modelmora.yaml     # optional, relative to this file
management: {provider: ollama, base_url: http://127.0.0.1:11434, budgets: {cuda:0: 24GB}}
input: "default input"                   # optional
steps:
  - model: mistral-small
    instruction: "Quick analysis: {input}"
    params: {temperature: 0.2, max_tokens: 256}
  - model: sdxl-base
    call: steps.py:illustrate              # a file next to the chain, or package.module:attr
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import ManagerConfig, describe_validation_error, require_units
from ..errors import ConfigError
from .executor import Chain, Step, StepCall


class StepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    model: str | None = None
    instruction: str = "{input}"
    call: str | None = Field(None, description="'package.module:function' or 'file.py:function'.")
    params: dict[str, Any] = Field(default_factory=dict)


class ChainFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    config: str | None = Field(None, description="Manager config YAML, relative to the chain file.")
    management: dict[str, Any] | None = None
    input: str | None = None
    steps: list[StepFile] = Field(min_length=1)


def resolve_call(ref: str, base: Path, source: str) -> StepCall:
    """Import ``module:attr`` (or ``path/to/file.py:attr`` relative to ``base``)."""
    module_ref, sep, attr = ref.rpartition(":")
    if not sep or not module_ref or not attr:
        raise ConfigError(
            f"{source}: call {ref!r} should look like 'package.module:function' or 'file.py:function'"
        )
    try:
        if module_ref.endswith(".py"):
            path = (base / module_ref).resolve()
            if not path.is_file():
                raise ConfigError(f"{source}: call {ref!r}: no file {path}")
            name = f"modelmora_chain_steps_{abs(hash(path))}"
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_ref)
    except ImportError as exc:
        raise ConfigError(f"{source}: call {ref!r}: cannot import {module_ref!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{source}: call {ref!r}: {module_ref!r} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]


def read_chain_file(path: str | Path) -> ChainFile:
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: chain file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read chain file ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'steps'")
    require_units(data.get("management"), source=f"{source}: management")  # as a config file's
    try:
        return ChainFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source, ChainFile)) from None


def load_chain(
    path: str | Path, *, config: ManagerConfig | str | Path | None = None, **kwargs: Any
) -> tuple[Chain, ChainFile]:
    """The chain a YAML file describes; ``config`` overrides the file's own config."""
    spec = read_chain_file(path)
    base = Path(path).resolve().parent
    source = str(path)
    steps = []
    for i, s in enumerate(spec.steps):
        call = resolve_call(s.call, base, f"{source}: steps.{i}") if s.call else None
        try:
            steps.append(
                Step(model=s.model, instruction=s.instruction, call=call, params=s.params, name=s.name)
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: steps.{i}: {exc}") from None
    cfg: ManagerConfig | str | None
    if isinstance(config, ManagerConfig):
        cfg = config
    else:
        cfg = str(config) if config is not None else (str(base / spec.config) if spec.config else None)
    chain = Chain(steps, management=spec.management or {}, config=cfg, **kwargs)
    return chain, spec


__all__ = ["ChainFile", "StepFile", "load_chain", "read_chain_file", "resolve_call"]
