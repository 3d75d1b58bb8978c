import logging

import pytest

from modelmora import events as ev


def test_bus_fans_out_and_survives_a_broken_subscriber(caplog: pytest.LogCaptureFixture) -> None:
    bus = ev.EventBus()
    seen: list[ev.Event] = []

    def broken(event: ev.Event) -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    unsubscribe = bus.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="modelmora"):
        bus.emit(ev.Loading(model="m", provider="p"))
    assert [e.kind for e in seen] == ["Loading"]
    assert "subscriber" in caplog.text and "boom" in caplog.text
    unsubscribe()
    bus.emit(ev.Loading(model="m", provider="p"))
    assert len(seen) == 1


def test_logging_subscriber_levels(caplog: pytest.LogCaptureFixture) -> None:
    quiet, loud = ev.LoggingSubscriber(verbose=False), ev.LoggingSubscriber(verbose=True)
    with caplog.at_level(logging.INFO, logger="modelmora"):
        quiet(ev.Loaded(model="m", provider="p", duration_s=1.5, memory={"cuda:0": 2 * 10**9}))
        assert caplog.records == []
        loud(ev.Loaded(model="m", provider="p", duration_s=1.5, memory={"cuda:0": 2 * 10**9}))
        loud(ev.LeaseAcquired(model="m", leases=1))  # leases stay at DEBUG
        quiet(ev.LoadFailed(model="m", provider="p", error="oom"))  # failures always warn
    assert [r.getMessage() for r in caplog.records] == [
        "loaded m in 1.50s (cuda:0 2.0 GB)",
        "failed to load m: oom",
    ]


def test_events_serialise() -> None:
    data = ev.Evicted(model="a", for_model="b", reason="least recently used", at=1.0).to_dict()
    assert data == {
        "event": "Evicted",
        "model": "a",
        "at": 1.0,
        "for_model": "b",
        "reason": "least recently used",
    }
    assert ev.describe(ev.Waiting(model="b", blockers=("a",))) == "b waits for memory held by a"
