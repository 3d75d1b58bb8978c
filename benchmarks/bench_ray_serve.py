"""modelmora's ``ray`` provider against Ray Serve's ``@serve.multiplexed``, same cluster,
same request traces, same run.

Three models, each a real torch module of 100 MB of weights, on one Ray node with room for two, replayed
by one client in request order:

* the periodic trace of issue 24 (``aaabcabac`` × 20, 180 requests), and
* ``bench_traces.py``'s agent-loop trace over three models (models called in turn),

through

* **Ray Serve**: one deployment, one replica, ``@serve.multiplexed(max_num_models_per_replica=2)``
  — Serve's model multiplexing (LRU within the replica; a load builds the model inside
  the replica process), called through a ``DeploymentHandle`` with
  ``multiplexed_model_id`` (no HTTP: the comparison is of the layers, not of an HTTP hop);
* **modelmora** (``eviction: cost`` and ``lru``): each model a named actor placed by the
  planner on the node's budget, called through ``mm.use()`` + ``handle.call``.

It reports per system: loads, the mean time per request, and the median time of the
requests that needed no load (the per-request overhead of the layer).  A modelmora load
starts an actor process (a Python process importing torch); a Serve load builds the model
inside the replica that already runs: per-load times differ by design, which the table
shows apart from the counts.

    PYTHONPATH=src python benchmarks/bench_ray_serve.py [--json] [--repeat 20]

Needs ``modelmora[ray]`` (``ray[default,serve]``); says so and exits 0 without it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

import anyio

GB = 10**9
MODELS = ("tiny_encoder", "tiny_encoder_b", "tiny_encoder_c")
SIZE_MB = 100  # each model's weights; with its actor process about 400 MB: room for two on 1 GB


def traces(repeat: int, seed: int = 0) -> dict[str, list[int]]:
    """Model indexes per request: the periodic trace, and an agent loop over the three."""
    periodic = [{"a": 0, "b": 1, "c": 2}[c] for c in "aaabcabac" * repeat]
    rng = random.Random(seed)
    agent: list[int] = []
    while len(agent) < len(periodic):  # a loop of 2-3 models, several rounds, then another
        loop = rng.sample(range(3), rng.choice([2, 3]))
        for _ in range(rng.randint(2, 5)):
            agent.extend(loop)
    return {"periodic": periodic, "agent loops": agent[: len(periodic)]}


def summary(times: list[float], loaded: list[bool]) -> dict[str, Any]:
    warm = [t for t, was in zip(times, loaded, strict=True) if not was]
    return {
        "loads": sum(loaded),
        "mean_ms": 1e3 * statistics.fmean(times),
        "overhead_ms": 1e3 * statistics.median(warm) if warm else None,
        "load_ms": 1e3 * statistics.median([t for t, was in zip(times, loaded, strict=True) if was] or [0.0]),
    }


async def through_modelmora(address: str, trace: list[int], eviction: str) -> dict[str, Any]:
    from modelmora import ModelManager
    from modelmora import events as ev
    from modelmora.memory import StaticProbe

    models = {
        f"m{i}": {
            "provider": "ray",
            "target": f"modelmora.testing.ray_cluster:{factory}",
            "device": "auto",
            "memory": "400MB",  # what its actor measures: the weights and the process (torch)
            "options": {"kwargs": {"size_mb": SIZE_MB}},
        }
        for i, factory in enumerate(MODELS)
    }
    config = {"models": models, "eviction": eviction, "providers": {"ray": {"address": address}}}
    loads: list[str] = []
    async with ModelManager(config, probe=StaticProbe({})) as mm:
        mm.events.subscribe(lambda e: loads.append(e.model) if isinstance(e, ev.Loaded) else None)
        times, loaded = [], []
        for i in trace:
            before = len(loads)
            t = time.perf_counter()
            async with mm.use(f"m{i}") as handle:
                await handle.call("encode", ["modelmora"])
            times.append(time.perf_counter() - t)
            loaded.append(len(loads) > before)
        await mm.unload_all(force=True)
    return summary(times, loaded)


def through_serve(trace: list[int]) -> dict[str, Any]:
    from ray import serve

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
    class Models:
        def __init__(self) -> None:
            self.loads = 0

        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str) -> Any:
            import importlib

            self.loads += 1
            factory = getattr(importlib.import_module("modelmora.testing.ray_cluster"), model_id)
            return factory(size_mb=SIZE_MB)

        def ping(self) -> int:
            return self.loads

        async def __call__(self, text: str) -> tuple[int, list[list[float]]]:
            model = await self.get_model(serve.get_multiplexed_model_id())
            return self.loads, model.encode([text])

    handle = serve.run(Models.bind(), name="multiplexed", route_prefix=None)
    last = handle.ping.remote().result()  # the replica is up, with no model yet (as modelmora starts)
    times, loaded = [], []
    for i in trace:
        t = time.perf_counter()
        count, _ = handle.options(multiplexed_model_id=MODELS[i]).remote("modelmora").result()
        times.append(time.perf_counter() - t)
        loaded.append(count > last)
        last = count
    serve.delete("multiplexed")
    return summary(times, loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="rounds of aaabcabac (20: 180 requests)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        print(f"skipped: Ray Serve is not installed ({exc}); pip install 'modelmora[ray]'")
        return
    from modelmora.testing.ray_cluster import local_cluster

    results: dict[str, dict[str, Any]] = {}
    # one node with room for two of the three models (its Ray memory resource is the budget)
    with local_cluster({"alpha": 1 * GB}, cpus=2) as cluster:
        for name, trace in traces(args.repeat).items():
            results[f"{name} · Ray Serve multiplexed"] = through_serve(trace)
            for eviction in ("cost", "lru"):
                results[f"{name} · modelmora {eviction}"] = anyio.run(through_modelmora, cluster.address, trace, eviction)
        serve.shutdown()
        del ray
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return
    print(f"{'trace · system':<40} {'loads':>6} {'mean/request':>13} {'no-load request':>16} {'per load':>10}")
    for label, r in results.items():
        overhead = f"{r['overhead_ms']:.2f} ms" if r["overhead_ms"] is not None else "-"
        print(f"{label:<40} {r['loads']:>6} {r['mean_ms']:>10.1f} ms {overhead:>16} {r['load_ms']:>7.0f} ms")


if __name__ == "__main__":
    main()
