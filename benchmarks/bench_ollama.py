"""Ollama provider overhead: load and unload through the provider vs the same raw httpx calls.

    python benchmarks/bench_ollama.py [--rounds 30]

Both talk to the emulator over loopback in the same run; the raw baseline sends exactly
the requests the provider sends (POST /api/generate, then GET /api/ps until the model is
listed/gone), so the difference is the provider's own cost: settings, retries wrapper,
error mapping, parsing, handles.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio
import anyio.lowlevel
import httpx

from modelmora.providers.ollama import OllamaProvider, OllamaSettings
from modelmora.spec import ModelSpec
from modelmora.testing.ollama import OllamaEmulator

MODEL = "qwen2.5:14b"


async def raw_cycle(client: httpx.AsyncClient) -> tuple[float, float]:
    t0 = time.perf_counter()
    (
        await client.post("/api/generate", json={"model": MODEL, "keep_alive": 360, "stream": False})
    ).raise_for_status()
    while not any(m["name"] == MODEL for m in (await client.get("/api/ps")).json()["models"]):
        pass
    t1 = time.perf_counter()
    (
        await client.post("/api/generate", json={"model": MODEL, "keep_alive": 0, "stream": False})
    ).raise_for_status()
    while any(m["name"] == MODEL for m in (await client.get("/api/ps")).json()["models"]):
        await anyio.lowlevel.checkpoint()
    return t1 - t0, time.perf_counter() - t1


async def provider_cycle(p: OllamaProvider, spec: ModelSpec) -> tuple[float, float]:
    t0 = time.perf_counter()
    handle = await p.load(spec)
    t1 = time.perf_counter()
    await p.unload(handle)
    return t1 - t0, time.perf_counter() - t1


async def main(rounds: int) -> dict[str, object]:
    with OllamaEmulator(models={MODEL: "9GB"}) as emu:
        spec = ModelSpec(name="qwen", provider="ollama", target=MODEL)
        async with (
            httpx.AsyncClient(base_url=emu.url) as client,
            OllamaProvider("ollama", OllamaSettings(base_url=emu.url, poll_interval=0.0005)) as p,  # intervals must be > 0
        ):
            for _ in range(3):  # warm up connections and code paths
                await raw_cycle(client)
                await provider_cycle(p, spec)
            raw, ours = [], []
            for _ in range(rounds):  # interleaved so drift hits both
                raw.append(await raw_cycle(client))
                ours.append(await provider_cycle(p, spec))
    out: dict[str, object] = {"rounds": rounds}
    for i, op in enumerate(("load", "unload")):
        r = statistics.median(x[i] for x in raw) * 1000
        o = statistics.median(x[i] for x in ours) * 1000
        out[op] = {
            "raw_ms": round(r, 3),
            "provider_ms": round(o, 3),
            "added_ms": round(o - r, 3),
            "added_percent": round(100 * (o - r) / r, 1),
        }
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = anyio.run(main, args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"Ollama provider vs raw httpx against the emulator (median of {args.rounds}):")
        for op in ("load", "unload"):
            r = result[op]
            assert isinstance(r, dict)
            print(
                f"  {op:7s} raw {r['raw_ms']:7.2f} ms   provider {r['provider_ms']:7.2f} ms   added {r['added_ms']:+.2f} ms ({r['added_percent']:+.1f}%)"
            )
