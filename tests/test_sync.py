"""The blocking facade runs the async manager in one portal thread."""

import threading

import pytest

from modelmora import ModelInUse, SyncModelManager
from modelmora.memory import StaticProbe
from modelmora.providers.simulated import SimulatedProvider


def test_sync_facade_round_trip() -> None:
    sim = SimulatedProvider()
    cfg = {"budgets": {"cuda:0": "16GB"}, "models": {"a": {"memory": "10GB"}, "b": {"memory": "10GB"}}}
    with SyncModelManager(cfg, providers={"simulated": sim}, probe=StaticProbe({})) as mm:
        loop_threads = set()
        with mm.use("a") as handle:
            assert handle.name == "a"
            loop_threads.add(threading.get_ident())
            with pytest.raises(ModelInUse):
                mm.unload("a")
        assert mm.loaded() == ["a"]
        assert mm.can_fit("b") is False
        mm.load("b")
        assert mm.loaded() == ["b"] and mm.is_loaded("b")
        assert mm.status().models[0].name == "b"
        assert mm.unload_all().unloaded == ["b"]
    assert sim.resident == {}
    assert sim.stats.loads == 2


def test_sync_facade_outside_with_is_an_error() -> None:
    mm = SyncModelManager({}, probe=StaticProbe({}))
    with pytest.raises(RuntimeError, match="inside a `with` block"):
        mm.loaded()
