"""What a model is: :class:`ModelSpec`, and the size and duration values it is written in.

Sizes follow the usual convention: ``GB``/``MB`` are powers of 1000, ``GiB``/``MiB`` powers
of 1024; in Python a bare number is bytes (a config file must name the unit, see
:func:`modelmora.config.require_units`).  Durations are seconds or Go-style strings
(``"5m"``, ``"1h30m"``, ``"500ms"``); ``0`` means "unload right after use" and ``-1``
means "never" (stored as ``math.inf``), as in Ollama's ``keep_alive``.  Other negative
values, NaN and infinities are refused.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

FOREVER = math.inf
AUTO = "auto"  # ModelSpec.device: the planner chooses (issue 23, automatic placement)
MAX_SIZE = 2**63 - 1  # bytes; what memory counters (and Prometheus, JSON consumers) can hold
MAX_SECONDS = 10**12  # ~31,700 years; longer is a mistake, not a duration (-1 means never)

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?|[+-]?\.\d+)\s*([a-zA-Z]*)\s*$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
}  # fmt: skip


def parse_size(value: str | int | float) -> int:
    """Parse ``"11.5GB"``, ``"512MiB"``, ``1024`` or ``"1e9"`` into a non-negative byte count."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '11.5GB' or '512MiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must be a finite, non-negative amount, got {_short(value)}")
        if value > MAX_SIZE:
            raise ValueError(f"a size must be below 2^63 bytes (9.2 EB), got {_short(value)}")
        return value
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"expected a size like '11.5GB' or '512MiB', got {value!r}") from None
        else:
            unit = match.group(2).lower()
            if unit not in _SIZE_UNITS:
                raise ValueError(
                    f"unknown size unit {match.group(2)!r} in {value!r} (use B, KB, MB, GB, TB "
                    "or KiB, MiB, GiB, TiB)"
                )
            number = float(match.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError(f"expected a size like '11.5GB' or '512MiB', got {value!r}")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"a size must be a finite, non-negative amount, got {_short(value)}")
    if number > MAX_SIZE:
        raise ValueError(f"a size must be below 2^63 bytes (9.2 EB), got {_short(value)}")
    return round(number)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"


def parse_duration(value: str | int | float) -> float:
    """Parse seconds or a Go-style duration; ``-1`` means forever (``math.inf``).

    Only -1 means never: another negative value, NaN or an infinity is refused (NaN used
    to compare false against every bound and so meant "forever" too)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '5m' or seconds, got {value!r}")
    if isinstance(value, int) and value > MAX_SECONDS:
        raise ValueError(f"a duration must be below {MAX_SECONDS} seconds (-1 means never), got {_short(value)}")  # fmt: skip
    if isinstance(value, int) and value < -1:
        raise ValueError(f"a duration cannot be negative (only -1 means never), got {_short(value)}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(
                    f"expected a duration like '30s', '5m', '1h30m', seconds, 0 or -1, got {value!r}"
                ) from None
            seconds = sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
            if seconds == -1:  # "-1s" is a duration of minus one second, not the -1 of "never"
                raise ValueError(
                    f"a duration cannot be negative (only -1 means never), got {value!r}"
                ) from None
    else:
        raise ValueError(f"expected a duration like '5m' or seconds, got {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(
            f"a duration must be a finite number of seconds (-1 means never), got {_short(value)}"
        )
    if seconds == -1:
        return FOREVER
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative (only -1 means never), got {_short(value)}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"a duration must be below {MAX_SECONDS} seconds (-1 means never), got {_short(value)}")  # fmt: skip
    return seconds + 0.0  # -0.0 is 0


def parse_interval(value: str | int | float) -> float:
    """A period or back-off: a positive, finite duration.  Unlike keep-alives and timeouts,
    -1 does not mean "never" here (a reaper that never runs is a mistake)."""
    bad = ValueError(f"expected a positive, finite duration like '1s' or '500ms', got {_short(value)}")
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = value  # an int beyond a float's range compares all the same
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            if value.strip().startswith("-"):
                raise bad from None
    if number is not None and not 0 < number < math.inf:
        raise bad
    seconds = parse_duration(value)
    if not 0 < seconds < math.inf:
        raise bad
    return seconds


def format_size(n: int | float) -> str:
    """Human-readable bytes in the units people use for GPUs (GB = 10^9)."""
    n = float(n)
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"


def format_memory(memory: Mapping[str, int], empty: str = "-") -> str:
    """``cuda:0 9.0 GB, cpu 1.2 GB`` (``empty`` when nothing is held or known)."""
    return ", ".join(f"{device} {format_size(n)}" for device, n in memory.items()) or empty


def format_duration(seconds: float | None) -> str:
    """A duration as the config writes one, so that what is printed can be pasted back:
    ``250ms``, ``1.5s``, ``45s``, ``1m30s``, ``5m``, ``1h30m``, ``49h``; ``never`` for -1's
    forever, ``-`` for none."""
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "never"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 0.9995:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 59.95:
        return f"{seconds:.1f}".removesuffix(".0") + "s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)


def _ser_duration(value: float) -> float | int:
    return -1 if math.isinf(value) else value


Size = Annotated[int, BeforeValidator(parse_size)]
"""Bytes, written as ``"11.5GB"``, ``"512MiB"`` or a number."""

Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(_ser_duration)]
"""Seconds, written as ``"5m"`` or a number; -1 means forever."""

Interval = Annotated[float, BeforeValidator(parse_interval)]
"""Seconds of a period or back-off, written as ``"5m"`` or a number; positive and finite."""

OPENAI_ENDPOINTS: Mapping[str, str] = {
    "chat": "chat/completions",
    "completions": "completions",
    "embeddings": "embeddings",
}
"""What a model may serve through the proxy (``ModelSpec.serves``) → the route below ``/v1/``."""

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,199}$")


def check_name(name: str, what: str = "model name") -> str:
    """Names reach URLs, labels and file names: allow a conservative character set only."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name or "//" in name:
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits and . _ : @ + / - "
            "(starting with a letter or digit, no '..')"
        )
    return name


HOOK_EVENTS = ("before_load", "after_load", "before_unload", "after_unload")
"""When a lifecycle hook runs: ``before_*`` are awaited before the runtime is asked,
``after_*`` start once it has answered and run in the background."""


def _check_command(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("a hook command cannot be empty")
    elif isinstance(value, list) and (
        not value or not all(isinstance(a, str) for a in value) or not value[0]
    ):
        raise ValueError(
            "a hook command is a string (run by the shell) or a non-empty list of strings (argv)"
        )
    return value


HookCommand = Annotated[str | list[str], BeforeValidator(_check_command)]
"""A shell command line (``"docker stop comfy"``) or an argv list (``[curl, -X, POST, ...]``)."""


# the levels a priority may take (a model's, an API key's, a request's X-Priority): waiting
# requests rise one level per ``scheduling.ageing`` seconds
PRIORITIES = (-1000, 1000)


class Hooks(BaseModel):
    """Commands run around a model's load and unload, with ``MODELMORA_MODEL``,
    ``MODELMORA_EVENT`` (the field's name) and ``MODELMORA_DEVICE`` in their environment.
    Each is bounded by ``hook_timeout``; a failure is logged and reported (a
    :class:`~modelmora.events.HookFailed` event), never fatal."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    before_load: HookCommand | None = Field(None, description="Awaited before the runtime loads it.")
    after_load: HookCommand | None = Field(None, description="Started once it is loaded (background).")
    before_unload: HookCommand | None = Field(None, description="Awaited before the runtime unloads it.")
    after_unload: HookCommand | None = Field(None, description="Started once it is unloaded (background).")

    def command(self, event: str) -> str | list[str] | None:
        value: str | list[str] | None = getattr(self, event)
        return value


class ModelSpec(BaseModel):
    """One model in the registry: where it runs and what it costs to keep resident."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Registry name used by callers, e.g. 'qwen-14b'.")
    provider: str = Field(
        "simulated", description="Provider instance that runs it, e.g. 'ollama', 'vllm', 'torch'."
    )
    target: str = Field(
        "",
        description="What the runtime calls it: 'qwen2.5:14b', a Hugging Face id, "
        "'package.module:factory'. Defaults to the name.",
    )
    device: str = Field(
        "cuda:0",
        description="Device it runs on, which a bare memory estimate applies to; 'auto': the "
        "planner places it on a GPU with a budget (the CPU when there is none).",
    )
    devices: list[str] | None = Field(
        None,
        description="Devices the planner may place it on (one of them, never split): e.g. "
        "[cuda:0, cuda:1]; implies device 'auto' when no device is given.",
        min_length=1,
    )
    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="GPUs it runs on at once (vLLM tensor_parallel_size, llama.cpp --tensor-split): "
        "the planner picks that many of its devices and puts an equal share of its accelerator "
        "memory on each, or the share its memory names per device when those are its devices; "
        "implies device 'auto' when no device is given.",
    )
    memory: dict[str, Size] = Field(
        default_factory=dict, description="Estimated bytes per device, replaced by measurements."
    )
    group: str | None = Field(None, description="Exclusive group: one resident member at a time.")
    keep_alive: Duration | None = Field(
        None, description="Idle time before unload; 0 = right after use, -1 = never."
    )
    pinned: bool = Field(False, description="Never evicted or reaped unless forced.")
    warm_tier: bool = Field(
        False,
        description="When idle or evicted, park in the runtime's warm tier (vLLM sleep, torch "
        "offload to CPU RAM) instead of unloading, where the provider has one.",
    )
    load_timeout: Duration = Field(
        600.0, gt=0, description="How long one load may take (-1: no limit; 0 would fail every load)."
    )
    load_time: Duration | None = Field(
        None, description="Expected load time (planning prior), replaced by measurements."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Provider options.")
    priority: int = Field(
        0,
        ge=PRIORITIES[0],
        le=PRIORITIES[1],
        description="Requests for it rank this high unless they say otherwise (higher first).",
    )
    max_concurrency: int | None = Field(
        None, ge=1, description="Leases held at once; more wait in line (unset: no limit)."
    )
    max_queue: int | None = Field(
        None, ge=0, description="Requests that may wait for it; one more is refused at once (HTTP 429)."
    )
    hooks: Hooks | None = Field(None, description="This model's lifecycle hooks (after the global ones).")
    serves: list[str] | None = Field(
        None,
        description="OpenAI endpoints it answers through the proxy: chat, completions, embeddings "
        "(default: what its provider says; e.g. a vLLM or llama.cpp embedding model: [embeddings]).",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "device" not in data:
            gpus = data.get("gpus")
            if data.get("devices") or (isinstance(gpus, int) and not isinstance(gpus, bool) and gpus > 1):
                data = {**data, "device": AUTO}
        if isinstance(data, dict) and isinstance(data.get("memory"), str | int | float):
            device = data.get("device", "cuda:0")
            if isinstance(device, str):  # a bad device is reported by its own field check
                data = dict(data)
                data["memory"] = {device: data["memory"]}
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("serves")
    @classmethod
    def _check_serves(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for item in value:
            if item not in OPENAI_ENDPOINTS:
                close = difflib.get_close_matches(str(item), list(OPENAI_ENDPOINTS), n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"{item!r} is not an endpoint the proxy serves (chat, completions, embeddings){hint}"
                )
        return sorted(set(value), key=list(OPENAI_ENDPOINTS).index)

    @field_validator("provider")
    @classmethod
    def _check_provider(cls, value: str) -> str:
        return check_name(value, "provider name")

    @model_validator(mode="after")
    def _default_target(self) -> ModelSpec:
        if not self.target:
            object.__setattr__(self, "target", self.name)
        return self

    @model_validator(mode="after")
    def _check_gpus(self) -> ModelSpec:
        if self.gpus > 1 and not self.placed:
            raise ValueError(
                f"gpus: {self.gpus} needs device: auto or a devices list to choose {self.gpus} GPUs "
                f"from, not the single device {self.device!r}"
            )
        if self.gpus > 1 and self.devices and len(set(self.devices)) < self.gpus:
            raise ValueError(
                f"gpus: {self.gpus} but devices lists only {len(set(self.devices))} "
                f"({', '.join(self.devices)}): list at least {self.gpus}"
            )
        return self

    @property
    def runs_on(self) -> tuple[str, ...]:
        """The devices a runtime starts it on: for a model of several ``gpus``, the set the
        planner chose (admission writes it to ``devices`` before the load), else its
        ``device``."""
        if self.gpus > 1 and self.devices and self.device != AUTO:
            return tuple(self.devices[: self.gpus])
        return (self.device,)

    @property
    def total_memory(self) -> int:
        return sum(self.memory.values())

    @property
    def placed(self) -> bool:
        """The planner chooses its device (``device: auto`` or a ``devices`` list)."""
        return self.device == AUTO or bool(self.devices)


__all__ = [
    "AUTO",
    "FOREVER",
    "HOOK_EVENTS",
    "OPENAI_ENDPOINTS",
    "Duration",
    "HookCommand",
    "Hooks",
    "Interval",
    "ModelSpec",
    "Size",
    "check_name",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_interval",
    "parse_size",
]
