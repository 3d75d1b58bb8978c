"""The ray provider on the real all-MiniLM-L6-v2, on a two-node Ray cluster on this machine.

    python benchmarks/bench_ray.py [--calls 200] [--json]

Starts ``alpha`` and ``beta`` (``modelmora.testing.ray_cluster.local_cluster``, one raylet
each), then through a :class:`ModelManager` with the ray provider:

* **load**: ``mm.use`` of a model not resident until the lease is held (actor created on
  the node the planner chose, model built there by sentence-transformers), seconds;
* **first call**: the first ``encode`` of one short sentence, seconds;
* **call overhead**: median seconds of ``get_max_seq_length`` (a call that does no work)
  three ways: a plain Ray actor method called directly (``await actor.m.remote()`` on an
  actor holding the same model: Ray's own cost), the provider's actor through its raw Ray
  handle, and modelmora's ``mm.use`` + ``handle.call`` (lease, actor call, release);
* **encode**: median seconds of ``encode`` of one sentence through the handle;
* **park / wake**: ``mm.park`` seconds, and the next ``mm.use`` (wake) seconds; on this
  CPU-only machine the move is a no-op, so these are the warm tier's fixed costs.

The request traces through Ray-hosted models against Ray Serve's ``@serve.multiplexed``
are ``bench_ray_serve.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import anyio

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GB = 10**9


async def run(calls: int) -> dict[str, Any]:
    import ray

    from modelmora import ModelManager
    from modelmora.memory import StaticProbe
    from modelmora.testing.models import minilm_path
    from modelmora.testing.ray_cluster import local_cluster

    spec = {
        "provider": "ray",
        "target": str(minilm_path()),
        "device": "auto",
        "memory": "400MB",
        "warm_tier": True,
        "options": {"kind": "sentence-transformers"},
    }
    out: dict[str, Any] = {}
    with local_cluster({"alpha": 4 * GB, "beta": 2 * GB}) as cluster:
        config = {"models": {"minilm": spec}, "providers": {"ray": {"address": cluster.address}}}
        async with ModelManager(config, probe=StaticProbe({})) as mm:
            t = time.perf_counter()
            async with mm.use("minilm") as handle:
                out["load_s"] = time.perf_counter() - t
                out["device"] = handle.device
                t = time.perf_counter()
                await handle.call("encode", ["modelmora keeps models resident"])
                out["first_call_s"] = time.perf_counter() - t
                actor = handle.runtime

            async def through_handle() -> None:
                async with mm.use("minilm") as h:
                    await h.call("get_max_seq_length")

            async def raw() -> None:
                await actor.call.remote("get_max_seq_length", (), {})

            @ray.remote(num_cpus=0)
            class Plain:
                def __init__(self, path: str) -> None:
                    from sentence_transformers import SentenceTransformer

                    self.model = SentenceTransformer(path, device="cpu")

                def get_max_seq_length(self) -> int:
                    return int(self.model.get_max_seq_length())

            plain = Plain.remote(str(minilm_path()))
            await plain.get_max_seq_length.remote()

            async def direct() -> None:
                await plain.get_max_seq_length.remote()

            async def encode() -> None:
                async with mm.use("minilm") as h:
                    await h.call("encode", ["modelmora keeps models resident"])

            for label, fn in (
                ("plain_ray_call_s", direct),
                ("provider_actor_raw_s", raw),
                ("handle_call_s", through_handle),
                ("encode_via_handle_s", encode),
            ):
                samples = []
                for _ in range(calls):
                    t = time.perf_counter()
                    await fn()
                    samples.append(time.perf_counter() - t)
                out[label] = statistics.median(samples)
            ray.kill(plain)
            t = time.perf_counter()
            await mm.park("minilm")
            out["park_s"] = time.perf_counter() - t
            t = time.perf_counter()
            async with mm.use("minilm"):
                out["wake_s"] = time.perf_counter() - t
            await mm.unload("minilm")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = anyio.run(run, args.calls)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"all-MiniLM-L6-v2 on a 2-node local Ray cluster, placed on {out['device']}")
    for key in ("load_s", "first_call_s", "park_s", "wake_s"):
        print(f"  {key[:-2]:<22} {out[key]:8.3f} s")
    for key in ("plain_ray_call_s", "provider_actor_raw_s", "handle_call_s", "encode_via_handle_s"):
        print(f"  {key[:-2]:<22} {out[key] * 1e3:8.2f} ms (median of {args.calls})")
    print("  against Ray Serve's @serve.multiplexed: python benchmarks/bench_ray_serve.py")


if __name__ == "__main__":
    main()
