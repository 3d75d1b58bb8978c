"""A chain's ``management`` dict: the seed's keys plus any global config field.

The seed's keys (``provider``, ``base_url``, ``timeout``, ``max_retries``, ``auto_unload``,
``verbose``, ``enabled``) are the chain's own; every other key is a :class:`ManagerConfig`
field (``budgets``, ``idle_ttl``, ``models``, ...) validated by the same model as the global
config and applied to this chain only, so a typo gets the same one-line error as in YAML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import ManagerConfig, deep_merge, describe_validation_error
from ..errors import ConfigError
from ..spec import Duration, parse_size


class Management(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Lifecycle control; False runs steps with none at all.")
    provider: str | None = Field(None, description="Provider for bare model names, e.g. 'ollama'.")
    base_url: str | None = Field(None, description="That provider's server.")
    timeout: Duration | None = Field(None, description="That provider's request timeout.")
    max_retries: int | None = Field(None, ge=1, description="That provider's attempts per request.")
    auto_unload: bool = Field(True, description="Unload a step's model once the plan no longer keeps it.")
    prefetch: bool = Field(True, description="Load the next step's model while a step runs, when it fits.")
    strategy: Literal["optimal", "next-use", "always-unload"] = Field(
        "optimal",
        description="Residency plan: the least total load time, the seeds' keep-only-if-the-next-step-"
        "reuses rule, or unload after every step.",
    )
    plan_budget: Duration = Field(
        0.2,
        ge=0,
        le=3600,
        description="Seconds the residency planner searches (in a worker thread) before it settles "
        "for its best plan so far; the plan says whether it is exact or how far from optimal it can be.",
    )
    verbose: bool = False
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Global config fields for this chain."
    )

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, enabled_by_default: bool = True, source: str = "management"
    ) -> Management:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
        own = {k: v for k, v in data.items() if k in cls.model_fields and k != "overrides"}
        rest = {k: v for k, v in data.items() if k not in own}
        own.setdefault("enabled", enabled_by_default)
        if rest:
            ManagerConfig.from_dict(rest, source=source)  # same checks and messages as the YAML config
        try:
            return cls.model_validate({**own, "overrides": rest})
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, source)) from None

    def provider_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {}
        if self.base_url is not None:
            settings["base_url"] = self.base_url
        if self.timeout is not None:
            settings["timeout"] = self.timeout
        if self.max_retries is not None:
            settings["retries"] = self.max_retries
        return settings

    def apply(self, config: ManagerConfig) -> ManagerConfig:
        """``config`` with this chain's overrides and provider settings merged in."""
        extra: dict[str, Any] = dict(self.overrides)
        if self.provider is not None:
            extra = deep_merge(extra, {"providers": {self.provider: self.provider_settings()}})
        if self.verbose:
            extra["verbose"] = True
        return config.merged(extra, source="chain management") if extra else config

    def budget_limits(self) -> dict[str, int]:
        """Absolute per-device budgets this chain asks for, applied even on a shared manager."""
        limits = {}
        for device, value in (self.overrides.get("budgets") or {}).items():
            if isinstance(value, int | float) or (isinstance(value, str) and not value.strip().endswith("%")):
                limits[device] = parse_size(value)
        return limits


__all__ = ["Management"]
