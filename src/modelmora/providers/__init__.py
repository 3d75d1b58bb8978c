"""Provider registry: names → factories, with lazy imports and entry-point plugins.

Built-in providers are import strings resolved on first use, so the core imports without
docker, torch or any runtime's client.  Third-party packages add providers through the
``modelmora.providers`` entry-point group (read lazily on the first unknown name) or at
run time with :func:`register_provider`.  A factory is a :class:`Provider` subclass
(its ``Settings`` model validates the settings) or any callable ``(name, settings) ->
Provider``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from ..config import ManagerConfig, describe_validation_error
from ..errors import ConfigError, ProviderUnavailable
from .base import Capabilities, Handle, Observed, Provider, ProviderSettings, Tier

Factory = Callable[[str, Mapping[str, Any]], Provider] | type[Provider]

ENTRY_POINT_GROUP = "modelmora.providers"

KNOWN_PROVIDERS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "simulated": ("modelmora.providers.simulated:SimulatedProvider", ""),
        "ollama": ("modelmora.providers.ollama:OllamaProvider", "pip install 'modelmora[ollama]'"),
        "vllm": ("modelmora.providers.vllm:VLLMProvider", "pip install 'modelmora[docker]'"),
        "process": ("modelmora.providers.process:ProcessProvider", ""),
        "llamacpp": ("modelmora.providers.llamacpp:LlamaCppProvider", ""),
        "llamacpp_router": ("modelmora.providers.llamacpp:LlamaCppRouterProvider", ""),
        "torch": ("modelmora.providers.torch:TorchProvider", "pip install 'modelmora[torch]'"),
        "ray": ("modelmora.providers.ray:RayProvider", "pip install 'modelmora[ray]'"),
    }
)


class ProviderRegistry:
    """Factories by type name.  One default instance; tests may build their own."""

    def __init__(self, known: Mapping[str, tuple[str, str]] = KNOWN_PROVIDERS):
        self._known = dict(known)
        self._factories: dict[str, Factory] = {}
        self._entry_points_read = False

    def names(self) -> list[str]:
        self._read_entry_points()
        return sorted(set(self._known) | set(self._factories))

    def register(self, name: str, factory: Factory | str, *, clobber: bool = False) -> None:
        """Register ``factory`` (or a ``"pkg.mod:Class"`` string) under ``name``."""
        if not clobber and (name in self._factories or name in self._known):
            raise ValueError(f"provider {name!r} is already registered; pass clobber=True")
        if isinstance(factory, str):
            self._factories.pop(name, None)
            self._known[name] = (factory, "")
        else:
            self._known.pop(name, None)
            self._factories[name] = factory

    def get(self, name: str) -> Factory:
        """The factory for ``name``, importing it on first use."""
        if name in self._factories:
            return self._factories[name]
        if name not in self._known:
            self._read_entry_points()
        if name in self._known:
            path, hint = self._known[name]
            module_name, _, attr = path.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                how = f"; install it with: {hint}" if hint else ""
                raise ProviderUnavailable(
                    f"provider {name!r} cannot be imported ({exc}){how}", provider=name
                ) from exc
            factory: Factory = getattr(module, attr)
            self._factories[name] = factory
            return factory
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown provider type {name!r} (available: {', '.join(names)}){hint}")

    def create(self, type_name: str, instance: str, settings: Mapping[str, Any]) -> Provider:
        """Build a provider instance, validating its settings into one ConfigError line."""
        factory = self.get(type_name)
        if isinstance(factory, type) and issubclass(factory, Provider):
            try:
                parsed = factory.Settings.model_validate(dict(settings))
            except ValidationError as exc:
                raise ConfigError(
                    describe_validation_error(exc, f"providers.{instance}", factory.Settings)
                ) from None
            return factory(instance, parsed)
        provider = factory(instance, settings)  # type: ignore[call-arg]
        if not isinstance(provider, Provider):
            raise ConfigError(
                f"provider factory for {type_name!r} returned {type(provider).__name__}, not a Provider"
            )
        return provider

    def _read_entry_points(self) -> None:
        if self._entry_points_read:
            return
        self._entry_points_read = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self._known.setdefault(ep.name, (ep.value, f"reinstall the package providing {ep.name!r}"))


registry = ProviderRegistry()


def register_provider(name: str, factory: Factory | str, *, clobber: bool = False) -> None:
    """Register a provider type in the default registry."""
    registry.register(name, factory, clobber=clobber)


def create_provider(type_name: str, instance: str | None = None, **settings: Any) -> Provider:
    """Build a provider from the default registry: ``create_provider("ollama", base_url=...)``."""
    return registry.create(type_name, instance or type_name, settings)


def available_providers() -> list[str]:
    return registry.names()


def check_providers(config: ManagerConfig, known: ProviderRegistry | None = None) -> None:
    """What starting the providers would refuse, without starting them: every provider
    instance (configured under ``providers:`` or named by a model) has a type that exists
    (one that is merely not installed passes) and settings its type accepts.  Every command
    runs it on the file it reads, and a registry edit before it writes, so no command
    accepts a file that another refuses."""
    known = known or registry
    users: dict[str, list[str]] = {}
    for name, spec in config.models.items():
        users.setdefault(spec.provider, []).append(name)
    for instance in sorted(set(config.providers) | set(users)):
        settings = dict(config.providers.get(instance) or {})
        type_name = str(settings.pop("type", instance))
        try:
            factory = known.get(type_name)
        except ProviderUnavailable:
            continue
        except ConfigError as exc:
            named_by = sorted(users.get(instance, []))
            where = f"models.{named_by[0]}.provider" if named_by else f"providers.{instance}.type"
            raise ConfigError(f"{where}: {exc}") from None
        if isinstance(factory, type) and issubclass(factory, Provider):
            try:
                factory.Settings.model_validate(settings)
            except ValidationError as exc:
                raise ConfigError(
                    describe_validation_error(exc, f"providers.{instance}", factory.Settings)
                ) from None


check_provider_types = check_providers  # its older name


__all__ = [
    "ENTRY_POINT_GROUP",
    "KNOWN_PROVIDERS",
    "Capabilities",
    "Factory",
    "Handle",
    "Observed",
    "Provider",
    "ProviderRegistry",
    "ProviderSettings",
    "Tier",
    "available_providers",
    "check_provider_types",
    "check_providers",
    "create_provider",
    "register_provider",
    "registry",
]
