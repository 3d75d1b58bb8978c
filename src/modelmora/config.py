"""ManagerConfig: the registry of models, provider settings and memory policy.

Config is a value object built at the edge (YAML file, dict, ``MODELMORA_*`` environment)
and passed into :class:`~modelmora.core.ModelManager`.  Every validation problem becomes
one :class:`~modelmora.errors.ConfigError` line naming the source, the field and what was
expected.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .spec import (
    AUTO,
    MAX_SIZE,
    PRIORITIES,
    Duration,
    Hooks,
    Interval,
    ModelSpec,
    Size,
    check_name,
    format_size,
    parse_size,
)

ENV_PREFIX = "MODELMORA_"
NOT_CONFIG = frozenset(
    {
        "MODELMORA_CONFIG",  # which file (the CLI's)
        "MODELMORA_URL",  # a server to act through (the CLI's)
        "MODELMORA_TOKEN",  # the server's token
        "MODELMORA_HOME",  # state and caches (process provider, `bench --quick`, the demo)
        "MODELMORA_STANDIN_LOAD_DELAY",  # the vLLM stand-in's timings (modelmora.testing)
        "MODELMORA_STANDIN_WAKE_DELAY",
        "MODELMORA_SCREENSHOT",  # test and benchmark knobs
        "MODELMORA_LOAD_STRICT",
        "MODELMORA_SOAK_OPS",
        "MODELMORA_MODEL",  # what a lifecycle hook's command is told (modelmora.hooks)
        "MODELMORA_EVENT",
        "MODELMORA_DEVICE",
        "MODELMORA_PROVIDER",
    }
)
"""``MODELMORA_*`` variables that are not config overrides."""


class Budget(BaseModel):
    """A device budget: absolute bytes, or a fraction of what the device has.  Written as
    ``"15.5GB"``, ``"90%"`` or a mapping ``{bytes: 15.5GB}`` / ``{percent: 90}``, with the
    same range checks either way."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bytes: Size | None = None
    percent: float | None = None

    @field_validator("percent", mode="before")
    @classmethod
    def _percent_in_range(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
            raise ValueError(f"a percentage budget must be in (0, 100], got {value!r}")
        return float(value)

    @model_validator(mode="after")
    def _one_of(self) -> Budget:
        if self.bytes is None and self.percent is None:
            raise ValueError("give bytes or percent, e.g. {bytes: 15.5GB} or {percent: 90}")
        if self.bytes is not None and self.percent is not None:
            raise ValueError("give bytes or percent, not both")
        return self

    @property
    def fraction(self) -> float | None:
        return None if self.percent is None else self.percent / 100

    @classmethod
    def parse(cls, value: Any) -> Budget:
        if isinstance(value, Budget):
            return value
        if isinstance(value, Mapping):
            try:
                return cls.model_validate(dict(value))
            except ValidationError as exc:  # one line, as a value error of the budgets field
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first["loc"])
                message = first["msg"].removeprefix("Value error, ")
                raise ValueError(f"{where}: {message}" if where else message) from None
        if isinstance(value, str) and value.strip().endswith("%"):
            try:
                percent = float(value.strip()[:-1])
            except ValueError:
                raise ValueError(f"expected a percentage like '90%', got {value!r}") from None
            if not 0 < percent <= 100:
                raise ValueError(f"a percentage budget must be in (0, 100], got {value!r}")
            return cls(percent=percent)
        return cls(bytes=parse_size(value))

    def resolve(self, total: int | None) -> int | None:
        """Bytes this budget allows on a device with ``total`` bytes (None when unknowable)."""
        if self.bytes is not None:
            return self.bytes
        if total is None or self.fraction is None:
            return None
        return int(total * self.fraction)

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        return format_size(self.bytes or 0)

    def serialise(self) -> str | int:
        """Lossless: bytes as a number, percentages as written."""
        return f"{self.percent!r}%" if self.percent is not None else int(self.bytes or 0)


BudgetValue = Annotated[Budget, BeforeValidator(Budget.parse), PlainSerializer(Budget.serialise)]


def parse_percent(value: Any) -> float:
    """``"5%"`` → 0.05: a percentage with its unit, at least 0."""
    bad = ValueError(f"expected a percentage like '5%', got {value!r}")
    if not isinstance(value, str) or not value.strip().endswith("%"):
        raise bad
    try:
        percent = float(value.strip()[:-1])
    except ValueError:
        raise bad from None
    if not 0 <= percent < float("inf"):
        raise bad
    return percent / 100


def _ser_percent(value: float) -> str:
    return f"{value * 100:g}%"


Percent = Annotated[float, BeforeValidator(parse_percent), PlainSerializer(_ser_percent)]
"""A fraction written as a percentage with its unit: ``"5%"``."""


class WatchdogConfig(BaseModel):
    """Memory that grows after a load, or that other processes take: every ``interval`` the
    watchdog reads the devices; past ``red_line`` above a GPU's budget it evicts idle models
    (cheapest to reload first) until the reading is back under the budget; past
    ``hard_line`` (or host RAM free under ``ram_floor``) it raises the alarm and, only with
    ``force``, force-unloads leased models."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    interval: Interval = Field(1.0, description="How often the devices are read.")
    red_line: Percent = Field(0.05, description="Above the budget, where idle models start to go.")
    hard_line: Percent = Field(0.15, description="Above the budget, where the alarm is raised.")
    ram_floor: Size | None = Field(None, description="Host RAM kept free; unset: not watched.")
    force: bool = Field(False, description="Past the hard line, force-unload leased models.")

    @model_validator(mode="after")
    def _hard_above_red(self) -> WatchdogConfig:
        if self.hard_line < self.red_line:
            raise ValueError(
                f"hard_line ({_ser_percent(self.hard_line)}) is below red_line ({_ser_percent(self.red_line)})"
            )
        return self


class SchedulingConfig(BaseModel):
    """How requests share models (issue 25): swap-aware admission, priorities, back-pressure.

    While a load waits for memory that busy models hold, each of them may still grant
    ``max_batch_before_swap`` more leases, and none once the load has waited ``max_wait``
    seconds (requests of equal or lower priority; a higher priority passes); then the swap
    happens as soon as the leases in flight end.  A model loaded less than
    ``min_residency`` seconds ago is not evicted for a request of equal or lower priority
    that has waited less than ``max_wait``.  A waiting request gains one priority level per
    ``ageing`` seconds.  A request that would queue past ``max_wait`` for a model at its
    ``max_concurrency`` is refused at once (Overloaded, HTTP 429)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_before_swap: int = Field(
        4, ge=0, description="Leases a busy model may still grant while a load waits for its memory."
    )
    max_wait: Duration = Field(
        30.0, gt=0, description="Seconds other requests may be served ahead of a waiting one."
    )
    min_residency: Duration = Field(
        0.0, ge=0, description="Seconds a loaded model stays before a non-urgent load may evict it."
    )
    ageing: Duration = Field(
        10.0, gt=0, description="Seconds of waiting that raise a request by one priority level."
    )


class PrefetchConfig(BaseModel):
    """Prefetch learned from live traffic (issue 24): after each request the manager looks
    up which model was asked for next after this one (its last 16 times); when one was
    at least ``min_probability`` of them, with at least ``min_observations`` counted, and
    it is not resident, it is loaded in the background, only into free memory (it never
    evicts or parks anything, and gives way to any other load or waiting caller)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Load the likely next model ahead of its request.")
    min_probability: float = Field(
        0.6, gt=0, le=1, description="How likely (0–1) the next model must be to be prefetched."
    )
    min_observations: int = Field(
        4, ge=1, description="Requests that followed the current model's before any guess is made."
    )


class ApiKeyConfig(BaseModel):
    """One API key of ``modelmora serve`` (issue 25): its secret is read from the environment
    variable ``token_env`` (never written in the file); requests carrying it as ``Authorization:
    Bearer`` rank at ``priority`` and share busy models with other keys by ``weight``, and may
    use only ``models`` (unset: all)."""

    model_config = ConfigDict(extra="forbid")

    token_env: str = Field(min_length=1, description="The environment variable that holds the key.")
    priority: int = Field(
        0,
        ge=PRIORITIES[0],
        le=PRIORITIES[1],
        description="Its requests' priority (higher first); X-Priority may only lower it.",
    )
    weight: float = Field(1.0, gt=0, description="Its share of a busy model against other keys.")
    models: list[str] | None = Field(None, description="The models it may use; unset: all.")


class ManagerConfig(BaseModel):
    """Everything a :class:`ModelManager` needs; see ``configs/modelmora.yaml``."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelSpec] = Field(default_factory=dict, description="The model registry.")
    providers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Provider instances by name; 'type' defaults to the instance name.",
    )
    budgets: dict[str, BudgetValue] = Field(
        default_factory=dict, description="Per device: '15.5GB' or '90%' of the device."
    )
    reserve: Size | None = Field(
        None,
        description="Kept free on each GPU whose budget is its measured total (and taken off "
        "percentage budgets when given); unset: 1 GiB per GPU, nothing off percentages.",
    )
    devices: list[str] | None = Field(
        None,
        description="The GPUs modelmora may use ('cuda:0', ...); unset: every GPU the probe lists. "
        "RAM ('cpu') is always allowed.",
    )
    default_model: str | None = None
    idle_ttl: Duration = Field(300.0, description="Default keep-alive for idle models.")
    max_loaded_models: int | None = Field(None, ge=1)
    reaper_interval: Interval = Field(1.0, description="How often idle models are looked for.")
    reconcile_interval: Interval = Field(30.0, description="How often runtimes are asked what they hold.")
    wait_timeout: Duration = Field(300.0, description="How long a load may wait for memory.")
    eviction: Literal["cost", "lru"] = Field(
        "cost",
        description="Which idle model goes first when room is needed: 'cost' keeps what is slow to "
        "reload, small and often used (GreedyDual-Size-Frequency); 'lru' the least recently used.",
    )
    prefetch: PrefetchConfig = Field(default_factory=PrefetchConfig)
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig)
    api_keys: dict[str, ApiKeyConfig] = Field(
        default_factory=dict,
        description="The server's API keys by name (each with its own priority and weight).",
    )
    unload_timeout: Duration = Field(120.0, gt=0)
    failure_cooldown: Interval = Field(5.0, description="First back-off after a failed load.")
    failure_cooldown_max: Interval = Field(300.0, description="Longest back-off after failed loads.")
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    outage_cooldown: Interval = Field(
        5.0,
        description="After a runtime was found unreachable, how long its models are refused at once "
        "(503 with Retry-After) before it is asked again; doubles while it stays down.",
    )
    outage_cooldown_max: Interval = Field(
        120.0, description="Longest back-off while a runtime stays unreachable."
    )
    hooks: Hooks = Field(default_factory=Hooks, description="Lifecycle hooks of every model.")
    hook_timeout: Interval = Field(30.0, description="How long one hook may run before it is killed.")
    on_startup: list[str] = Field(
        default_factory=list, description="Models loaded when the manager starts (a failure is logged)."
    )
    baseline: str | None = Field(
        None,
        description="A model brought back, in the background, whenever it fits without evicting "
        "anything and nothing else loads or waits.",
    )
    verbose: bool = False

    @model_validator(mode="before")
    @classmethod
    def _bypass_limit_is_the_batch_bound(cls, data: Any) -> Any:
        """``lease_bypass_limit`` (before issue 25) is ``scheduling.max_batch_before_swap``."""
        if isinstance(data, dict) and "lease_bypass_limit" in data:
            data = dict(data)
            limit = data.pop("lease_bypass_limit")
            scheduling = data.get("scheduling")
            if scheduling is None or isinstance(scheduling, dict):
                data["scheduling"] = {"max_batch_before_swap": limit, **(scheduling or {})}
        return data

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            models = {}
            for key, value in data["models"].items():
                if isinstance(value, dict):
                    value = {"name": key, **value}
                models[key] = value
            data = {**data, "models": models}
        return data

    @field_validator("models")
    @classmethod
    def _keys_match_names(cls, models: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        for key, spec in models.items():
            if spec.name != key:
                raise ValueError(f"model key {key!r} and its name {spec.name!r} differ")
        return models

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, providers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in providers:
            check_name(name, "provider name")
        return providers

    @field_validator("budgets")
    @classmethod
    def _budgets_name_used_devices(
        cls, budgets: dict[str, Budget], info: ValidationInfo
    ) -> dict[str, Budget]:
        models, providers = info.data.get("models"), info.data.get("providers")
        if models is None or providers is None:
            return budgets  # their own error is reported
        used = devices_in_use(models.values(), providers)
        for device in budgets:
            if device not in used and not KNOWN_DEVICE.fullmatch(device):
                raise ValueError(unknown_device(device, used))
        return budgets

    @field_validator("devices")
    @classmethod
    def _devices_cover_models(cls, devices: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if devices is None:
            return None
        for device in devices:
            if not KNOWN_DEVICE.fullmatch(device):
                hint = _device_hint(device, ())
                raise ValueError(f"{device!r} is not a device name (cpu, cuda:N){hint}")
        allowed = {*devices, "cpu"}
        shown = ", ".join(devices) or "none"
        for name, spec in (info.data.get("models") or {}).items():
            # its device when given (or when nothing else says where it goes), and its memory's
            named = "device" in spec.model_fields_set or not spec.memory
            for device in (*([spec.device] if named else []), *spec.memory, *(spec.devices or ())):
                if KNOWN_DEVICE.fullmatch(device) and device not in allowed:
                    where = (
                        "device"
                        if device == spec.device
                        else "devices"
                        if device in (spec.devices or ())
                        else "memory"
                    )
                    raise ValueError(
                        f"model {name!r} uses {device} (its {where}), which is not among the devices "
                        f"modelmora may use ({shown}); give it one of those, or add {device}"
                    )
        for device in info.data.get("budgets") or {}:
            if device not in allowed:
                raise ValueError(
                    f"budgets.{device} names a device modelmora may not use ({shown}); "
                    f"remove that budget, or add {device}"
                )
        return list(dict.fromkeys(devices))

    @field_validator("api_keys")
    @classmethod
    def _keys_name_models(
        cls, keys: dict[str, ApiKeyConfig], info: ValidationInfo
    ) -> dict[str, ApiKeyConfig]:
        models = info.data.get("models")
        for name, key in keys.items():
            for model in key.models or ():
                if models is not None and model not in models:
                    raise ValueError(f"api key {name!r}: {_unknown(model, models)}")
        return keys

    @field_validator("on_startup")
    @classmethod
    def _preloads_are_registered(cls, value: list[str], info: ValidationInfo) -> list[str]:
        models = info.data.get("models")
        if models is None:
            return value  # their own error is reported
        for name in value:
            if name not in models:
                raise ValueError(_unknown(name, models))
        return list(dict.fromkeys(value))

    @field_validator("default_model", "baseline")
    @classmethod
    def _default_is_registered(cls, value: str | None, info: ValidationInfo) -> str | None:
        models = info.data.get("models")
        if value is not None and models is not None and value not in models:
            raise ValueError(_unknown(value, models))
        return value

    # -- construction at the edge -------------------------------------------------------

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "config",
        environ: Mapping[str, str] | None = None,
    ) -> ManagerConfig:
        """Validate a dict, applying ``MODELMORA_*`` overrides from ``environ`` if given."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        merged = dict(data)
        sources: dict[tuple[str, ...], str] = {}
        if environ is not None:
            overrides = env_overrides(environ)
            sources = env_sources(environ)
            require_units(overrides, sources)
            merged = deep_merge(merged, overrides)
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            # a value that came from the environment is the environment's mistake, not the file's
            loc = tuple(str(p) for p in exc.errors(include_url=False)[0]["loc"])
            blamed = next((var for path, var in sources.items() if loc[: len(path)] == path), None)
            raise ConfigError(
                describe_validation_error(exc, f"environment {blamed}" if blamed else source)
            ) from None

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
    ) -> ManagerConfig:
        """Read a YAML file; a missing or malformed file is a one-line ConfigError."""
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read config file ({exc})") from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None
        # an empty file (or one of comments) is an empty config; `[]`, `0` or `false` is not
        require_units(data, source=source)
        return cls.from_dict({} if data is None else data, source=source, environ=environ)

    def merged(self, overrides: Mapping[str, Any], *, source: str = "overrides") -> ManagerConfig:
        """A copy with ``overrides`` deep-merged in (how per-chain config is applied)."""
        base = self.model_dump(mode="json", exclude_unset=False)
        return ManagerConfig.from_dict(deep_merge(base, dict(overrides)), source=source)

    def to_yaml_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_defaults=True)
        for name, spec in data.get("models", {}).items():
            if spec.get("name") == name:
                spec.pop("name")
        return data

    def spec(self, name: str) -> ModelSpec:
        from .errors import UnknownModel

        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(name, self.models) from None

    def describe(self) -> str:
        return (
            f"{len(self.models)} models, budgets "
            + (", ".join(f"{d}={b}" for d, b in self.budgets.items()) or "none")
            + (f", reserve {format_size(self.reserve)}" if self.reserve else "")
        )


KNOWN_DEVICE = re.compile(r"cpu|cuda:\d+")
"""Device names a budget may give without a model using them (a GPU not used yet)."""


def devices_in_use(specs: typing.Iterable[ModelSpec], providers: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The devices models name: their ``device``, their memory's devices and the ``device``
    setting of provider instances (an Ollama on another host: ``box-b:cuda:0``)."""
    used: set[str] = set()
    for spec in specs:
        used.update(d for d in (spec.device, *spec.memory) if d != AUTO)
        used.update(spec.devices or ())
    for settings in providers.values():
        device = settings.get("device") if isinstance(settings, Mapping) else None
        if isinstance(device, str):
            used.add(device)
    return used


_GPU_LIKE = re.compile(r"(?:gpu|cuda|nvidia|device|dev)\s*[:_#-]?\s*(\d+)", re.IGNORECASE)
_RAM_LIKE = frozenset({"ram", "host", "memory", "mem", "system", "cpu0", "cpu:0"})


def _device_hint(device: str, used: typing.Collection[str]) -> str:
    """'; did you mean …?' for a string that is no device name, or ''."""
    gpu = _GPU_LIKE.fullmatch(device.strip())
    if gpu:
        close: str | None = f"cuda:{int(gpu.group(1))}"
    elif device.strip().lower() in _RAM_LIKE:
        close = "cpu"
    else:
        candidates = sorted(set(used) | {"cpu", "cuda:0"})
        found = difflib.get_close_matches(device, candidates, n=1, cutoff=0.5)
        close = found[0] if found else None
    return f"; did you mean {close!r}?" if close else ""


def unknown_device(device: str, used: typing.Collection[str]) -> str:
    """One line for a budget's device that no model uses and that names no device."""
    hint = _device_hint(device, used)
    known = ", ".join(sorted(used)) or "none"
    return (
        f"{device!r} is a device no model uses (models use: {known}) and not a device name "
        f"(cpu, cuda:N){hint}"
    )


# -- sizes in files name their unit -------------------------------------------------------------


def require_units(
    data: Any, sources: Mapping[tuple[str, ...], str] | None = None, *, source: str = "config"
) -> None:
    """Refuse a size written as a bare number in a config file or the environment: in a
    file ``memory: 12`` meant 12 GB, not 12 bytes.  ``0`` needs no unit.  Python callers
    give bytes (``ManagerConfig.from_dict``), and dumps reload losslessly.  ``sources``:
    config path → environment variable, to blame the variable instead of ``source``."""
    if not isinstance(data, Mapping):
        return
    for path, value in _sizes(data):
        hint = _unit_hint(value)
        if hint is None:
            continue
        blamed = next((var for p, var in (sources or {}).items() if path[: len(p)] == p), None)
        where = f"environment {blamed}" if blamed else source
        field = ".".join(path)
        raise ConfigError(
            f"{where}: {field}: a size needs a unit (GB, MB, GiB, ... or B for bytes): did you mean {hint}?"
        )


def _sizes(data: Mapping[str, Any]) -> typing.Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) of every size a config gives: models' memory, budgets, reserve."""
    models = data.get("models")
    if isinstance(models, Mapping):
        for name, spec in models.items():
            memory = spec.get("memory") if isinstance(spec, Mapping) else None
            if isinstance(memory, Mapping):
                for device, value in memory.items():
                    yield ("models", str(name), "memory", str(device)), value
            elif memory is not None:
                yield ("models", str(name), "memory"), memory
    budgets = data.get("budgets")
    if isinstance(budgets, Mapping):
        for device, value in budgets.items():
            if isinstance(value, Mapping):
                if "bytes" in value:
                    yield ("budgets", str(device), "bytes"), value["bytes"]
            else:
                yield ("budgets", str(device)), value
    if "reserve" in data:
        yield ("reserve",), data["reserve"]


def _unit_hint(value: Any) -> str | None:
    """What a unit-less size probably meant (None: it has a unit, is 0, or is not a number,
    which the field's own check reports)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        text = value.strip()
    elif isinstance(value, int | float):
        if isinstance(value, int) and not 0 < value <= MAX_SIZE:
            return None  # 0, or out of range: the field's own error
        number, text = float(value), repr(value)
    else:
        return None
    if number == 0 or not 0 < number <= MAX_SIZE:
        return None  # 0 is 0 in any unit; the rest is the field's own error (NaN included)
    if number >= 10**6:  # looks like bytes already
        return repr(f"{int(number)}B" if number == int(number) else f"{text}B")
    return repr(f"{text}GB")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that appears twice in one mapping (it would keep
    the last silently: two models of one name, two ``idle_ttl`` lines)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class says so
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``MODELMORA_IDLE_TTL=10m`` → ``{"idle_ttl": "10m"}``; ``__`` nests
    (``MODELMORA_PROVIDERS__OLLAMA__BASE_URL``); ``MODELMORA_BUDGETS`` takes
    ``"cuda:0=15.5GB,cpu=80%"`` or JSON.  Variables in :data:`NOT_CONFIG` are left alone."""
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        path = _env_path(key)
        if not path:
            continue
        value: Any = raw
        if path == ["budgets"]:
            value = _parse_budgets_env(raw)
        elif raw.startswith(("{", "[")):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise ConfigError(f"environment {key}: invalid JSON") from None
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment {key}: conflicts with another MODELMORA_ variable")
        node[path[-1]] = value
    return out


def _env_path(key: str) -> list[str]:
    """The config path a ``MODELMORA_*`` variable overrides; empty when it overrides none."""
    if not key.startswith(ENV_PREFIX) or key in NOT_CONFIG:
        return []
    return [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]


def env_sources(environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Config path → the variable that sets it, to name the variable in errors."""
    return {tuple(path): key for key in environ if (path := _env_path(key))}


def _parse_budgets_env(raw: str) -> dict[str, str]:
    raw = raw.strip()
    if raw.startswith("{"):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise ConfigError("environment MODELMORA_BUDGETS: invalid JSON") from None
        return {str(k): v for k, v in value.items()}
    budgets = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        device, sep, amount = item.partition("=")
        if not sep:
            raise ConfigError(
                f"environment MODELMORA_BUDGETS: expected 'device=size' items like "
                f"'cuda:0=15.5GB,cpu=80%', got {item!r}"
            )
        budgets[device.strip()] = amount.strip()
    return budgets


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_:@/+-][A-Za-z0-9_:.@/+-]*")
_FRIENDLY = {
    "extra_forbidden": "unknown field",
    "missing": "required field missing",
}


def describe_validation_error(exc: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """One readable line for a pydantic error: source, dotted field path, what was expected."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    field = ".".join(p if _PLAIN_KEY.fullmatch(p) else repr(p) for p in loc) or "(top level)"
    kind = first["type"]
    message = _FRIENDLY.get(kind) or first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if kind == "extra_forbidden":
        allowed = _allowed_fields(model or ManagerConfig, loc)
        close = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6) if allowed else []
        if close:
            message += f" (did you mean {close[0]!r}?)"
        elif allowed:
            message += f" (expected one of: {', '.join(sorted(allowed))})"
    elif kind != "missing" and not isinstance(first.get("input"), dict | list):
        got = repr(first.get("input"))
        got = got if len(got) <= 60 else f"{got[:40]}…({len(got)} characters)"
        if got not in message and "got " not in message:
            message += f", got {got}"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{source}: {field}: {message}{more}"


def _allowed_fields(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names valid where ``loc`` points, walking nested models and dicts of models."""
    current: Any = model
    parts = loc[:-1]
    i = 0
    while i < len(parts):
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        info = current.model_fields.get(parts[i])
        if info is None:
            return []
        current = _unwrap_optional(info.annotation)
        if typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
            i += 1  # the dict key
        i += 1
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap_optional(annotation: Any) -> Any:
    """``X`` for ``X | None`` (e.g. a model's ``hooks: Hooks | None``); others unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _unknown(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{name!r} is not a registered model{hint}"


__all__ = [
    "KNOWN_DEVICE",
    "NOT_CONFIG",
    "Budget",
    "ManagerConfig",
    "PrefetchConfig",
    "WatchdogConfig",
    "deep_merge",
    "describe_validation_error",
    "devices_in_use",
    "env_overrides",
    "env_sources",
    "require_units",
]
