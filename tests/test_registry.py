from collections.abc import Mapping
from typing import Any

import pytest

from modelmora import ConfigError, ProviderUnavailable
from modelmora.providers import ProviderRegistry, create_provider
from modelmora.providers.base import Handle, Observed, Provider, ProviderSettings
from modelmora.providers.simulated import SimulatedProvider
from modelmora.spec import ModelSpec


class EchoSettings(ProviderSettings):
    url: str = "http://127.0.0.1:1"


class EchoProvider(Provider):
    Settings = EchoSettings

    async def load(self, spec: ModelSpec) -> Handle:
        return Handle(spec=spec, provider=self.name)

    async def unload(self, handle: Handle) -> dict[str, int]:
        return {}

    async def observe(self) -> list[Observed]:
        return []


def test_known_providers_are_lazy_and_simulated_is_built_in() -> None:
    reg = ProviderRegistry()
    assert {"simulated", "ollama", "vllm", "process", "torch"} <= set(reg.names())
    provider = reg.create("simulated", "sim-a", {"load_time": "2s"})
    assert isinstance(provider, SimulatedProvider)
    assert provider.name == "sim-a"
    assert provider.settings.load_time == 2.0  # type: ignore[attr-defined]


def test_register_refuses_silent_overwrite() -> None:
    reg = ProviderRegistry()
    reg.register("echo", EchoProvider)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("echo", EchoProvider)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("simulated", EchoProvider)
    reg.register("simulated", EchoProvider, clobber=True)
    assert isinstance(reg.create("simulated", "s", {}), EchoProvider)


def test_settings_are_validated_into_one_line() -> None:
    reg = ProviderRegistry()
    reg.register("echo", EchoProvider)
    with pytest.raises(ConfigError, match=r"providers.mine: urll: unknown field \(did you mean 'url'\?\)"):
        reg.create("echo", "mine", {"urll": "x"})


def test_callable_factories_and_import_strings() -> None:
    reg = ProviderRegistry()

    def factory(name: str, settings: Mapping[str, Any]) -> Provider:
        return EchoProvider(name, EchoSettings(**settings))

    reg.register("fn", factory)
    assert isinstance(reg.create("fn", "x", {"url": "u"}), EchoProvider)
    reg.register("by-path", "test_registry:EchoProvider")
    assert isinstance(reg.create("by-path", "y", {}), EchoProvider)
    reg.register("bad", lambda name, settings: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="not a Provider"):
        reg.create("bad", "z", {})


def test_unknown_and_uninstallable_providers() -> None:
    reg = ProviderRegistry()
    with pytest.raises(ConfigError, match="unknown provider type 'nope'"):
        reg.get("nope")
    reg.register("missing", "modelmora_not_installed.mod:Thing")
    with pytest.raises(ProviderUnavailable, match="cannot be imported"):
        reg.get("missing")


def test_entry_points_are_read_on_first_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    import modelmora.providers as providers_mod

    eps = [EntryPoint(name="thirdparty", value="test_registry:EchoProvider", group="modelmora.providers")]
    monkeypatch.setattr(
        providers_mod, "entry_points", lambda group: eps if group == "modelmora.providers" else []
    )
    reg = ProviderRegistry()
    assert isinstance(reg.create("thirdparty", "tp", {}), EchoProvider)
    assert "thirdparty" in reg.names()


def test_create_provider_default_registry() -> None:
    provider = create_provider("simulated", unload_time=0.5)
    assert provider.name == "simulated"
