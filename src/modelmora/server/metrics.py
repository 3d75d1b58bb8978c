"""Prometheus metrics: counters fed by lifecycle events, gauges read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .. import events as ev
from ..core import ModelManager


class Metrics:
    def __init__(self, manager: ModelManager):
        self.manager = manager
        self.registry = CollectorRegistry()
        r = self.registry
        self.loads = Counter("modelmora_loads", "Completed model loads.", ["model"], registry=r)
        self.load_failures = Counter("modelmora_load_failures", "Failed model loads.", ["model"], registry=r)
        self.unloads = Counter("modelmora_unloads", "Completed unloads.", ["model", "reason"], registry=r)
        self.evictions = Counter("modelmora_evictions", "Models evicted to make room.", ["model"], registry=r)
        self.load_seconds = Histogram(
            "modelmora_load_duration_seconds", "Time to load a model.", ["model"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
        )  # fmt: skip
        self.resident = Gauge(
            "modelmora_resident_bytes", "Memory held per model and device.", ["model", "device"], registry=r
        )
        self.budget = Gauge("modelmora_budget_bytes", "Memory budget per device.", ["device"], registry=r)
        self.leases = Gauge("modelmora_leases", "Leases held per model.", ["model"], registry=r)
        self.queue = Gauge("modelmora_queue_depth", "Proxy requests waiting for a model.", registry=r)
        self.requests = Counter(
            "modelmora_proxy_requests", "OpenAI-proxy requests by outcome.", ["model", "status"], registry=r
        )
        manager.events.subscribe(self._on_event, leases=False)  # counts none of them
        self._request_children: dict[tuple[str, int], Counter] = {}

    def count_request(self, model: str, status: int) -> None:
        """One proxied request for ``model`` answered ``status``.  The labelled child is kept:
        ``labels()`` takes a lock and builds its key on every call, on the proxy's hot path."""
        child = self._request_children.get((model, status))
        if child is None:
            child = self._request_children[(model, status)] = self.requests.labels(model, str(status))
        child.inc()

    def _on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.Loaded):
            self.loads.labels(e.model).inc()
            self.load_seconds.labels(e.model).observe(e.duration_s)
        elif isinstance(e, ev.LoadFailed):
            self.load_failures.labels(e.model).inc()
        elif isinstance(e, ev.Unloaded):
            self.unloads.labels(e.model, e.reason).inc()
        elif isinstance(e, ev.Evicted):
            self.evictions.labels(e.model).inc()

    def render(self, queue_depth: int) -> bytes:
        """The exposition text, with gauges refreshed from the manager's table."""
        self.resident.clear()
        self.leases.clear()
        for entry in self.manager.entries():
            self.leases.labels(entry.name).set(entry.leases)
            for device, n in entry.memory.items():
                self.resident.labels(entry.name, device).set(n)
        for device, budget in self.manager.budgets.items():
            self.budget.labels(device).set(budget)
        self.queue.set(queue_depth)
        return generate_latest(self.registry)


__all__ = ["Metrics"]
