"""Load test of `modelmora serve`'s OpenAI proxy from a second process on loopback.

    python benchmarks/load_proxy.py [--requests 200] [--levels 1,10,100] [--load-delay 0.05] [--json]
    python benchmarks/load_proxy.py --retrying 100 [--queue-limit 16] [--load-delay 0.5] [--json]

The server runs as its own process (``modelmora serve``) in front of the Ollama emulator
(another thread of this process, loads taking ``--load-delay`` seconds) with two models in
one exclusive group, so every change of model is a swap.  At each concurrency level the
clients send ``--requests`` chat completions alternating between the two models, and the
report gives requests/s, latency percentiles, swaps, and the requests lost or answered by
the wrong model (which must both be 0).

``--retrying N`` measures the queue limit instead: N requests at once, alternating between
the two models, each retried every 0.5 s while the server answers 503 (as clients honouring
``Retry-After`` loosely do), against a server started with ``--queue-limit``; the report
gives the swaps, the wall time and the 503s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio
import httpx
import yaml

from modelmora.net import free_port
from modelmora.testing.ollama import OllamaEmulator

MODELS = {"qwen": "qwen2.5:14b", "mistral": "mistral-small:22b"}


def start_server(config: Path, port: int, queue_limit: int = 1000) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelmora.cli", "serve", "-c", str(config), "--port", str(port), "--queue-limit", str(queue_limit)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MODELMORA_HOME": str(config.parent / f"home-{port}")},  # its state stays in the run's folder
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("modelmora serve did not start")
        time.sleep(0.1)


async def level(url: str, concurrency: int, total: int) -> dict[str, Any]:
    latencies: list[float] = []
    lost = wrong = 0
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal lost, wrong
        for i in counter:
            name = list(MODELS)[i % 2]
            body = {"model": name, "messages": [{"role": "user", "content": f"request {i}"}]}
            t = time.perf_counter()
            try:
                reply = await http.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:
                lost += 1
                continue
            latencies.append(time.perf_counter() - t)
            if reply.status_code != 200:
                lost += 1
            elif (
                reply.json().get("model") != name  # the proxy answers with the name asked for
                or f"request {i}" not in reply.json()["choices"][0]["message"]["content"]
            ):
                wrong += 1

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with (
        httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http,
        anyio.create_task_group() as tg,
    ):
        for _ in range(concurrency):
            tg.start_soon(client, http)
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [0.0] * 99
    return {"concurrency": concurrency, "requests": total, "ok": len(latencies) - 0, "lost": lost, "wrong_model": wrong,
            "requests_per_s": total / wall, "p50_ms": q[49] * 1000, "p95_ms": q[94] * 1000, "p99_ms": q[98] * 1000,
            "wall_s": wall}  # fmt: skip


async def retrying(url: str, total: int, pause: float = 0.5) -> dict[str, Any]:
    """``total`` requests at once, each retried every ``pause`` s while answered 503."""
    refused = lost = wrong = 0

    async def client(http: httpx.AsyncClient, i: int) -> None:
        nonlocal refused, lost, wrong
        name = list(MODELS)[i % 2]
        body = {"model": name, "messages": [{"role": "user", "content": f"request {i}"}]}
        while True:
            try:
                reply = await http.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:
                lost += 1
                return
            if reply.status_code != 503:
                break
            refused += 1
            await anyio.sleep(pause)
        if reply.status_code != 200:
            lost += 1
        elif reply.json().get("model") != name or f"request {i}" not in reply.json()["choices"][0]["message"]["content"]:
            wrong += 1

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http, anyio.create_task_group() as tg:
        for i in range(total):
            tg.start_soon(client, http, i)
    return {"requests": total, "refused_503": refused, "lost": lost, "wrong_model": wrong,
            "wall_s": time.perf_counter() - started}  # fmt: skip


def v1_context(emu: OllamaEmulator) -> int:
    """The context the server gives requests that send none: its VRAM-tier default, capped
    at the models' trained context.  /v1 requests cannot send ``num_ctx``, so the provider
    must load with this one, or Ollama reloads each model on its first /v1 request."""
    return min(emu.state.default_num_ctx, min(m.context_length for m in emu.state.catalogue.values()))


def write_config(folder: Path, emu: OllamaEmulator) -> Path:
    """The server's config: the two models in one exclusive group under a 16 GB budget."""
    config = folder / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "budgets": {"cuda:0": "16GB"}, "idle_ttl": "5m",
        "providers": {"ollama": {"base_url": emu.url, "num_ctx": v1_context(emu)}},
        "models": {n: {"provider": "ollama", "target": t, "memory": "10GB", "group": "heavy"} for n, t in MODELS.items()},
    }))  # fmt: skip
    return config


def run_retrying(total: int, queue_limit: int, load_delay: float) -> dict[str, Any]:
    emu = OllamaEmulator(
        models={t: "10GB" for t in MODELS.values()}, vram="48GB", load_delay=load_delay
    ).start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), emu)
        server = start_server(config, port, queue_limit)
        try:
            before = emu.stats.loads
            row = anyio.run(retrying, f"http://127.0.0.1:{port}", total)
            row["swaps"] = emu.stats.loads - before
        finally:
            server.terminate()
            server.wait(timeout=30)
            emu.stop()
    return {**row, "queue_limit": queue_limit, "load_delay_s": load_delay}


def run(requests: int, levels: list[int], load_delay: float) -> dict[str, Any]:
    emu = OllamaEmulator(
        models={t: "10GB" for t in MODELS.values()}, vram="24GB", load_delay=load_delay
    ).start()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), emu)
        server = start_server(config, port)
        try:
            loads_before = emu.stats.loads
            results = []
            for c in levels:
                before = emu.stats.loads
                row = anyio.run(level, f"http://127.0.0.1:{port}", c, requests)
                row["swaps"] = emu.stats.loads - before
                results.append(row)
            total_loads = emu.stats.loads - loads_before
        finally:
            server.terminate()
            server.wait(timeout=30)
            emu.stop()
    return {
        "levels": results,
        "emulator_loads": total_loads,
        "load_delay_s": load_delay,
        "requests_per_level": requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--levels", default="1,10,100")
    parser.add_argument("--load-delay", type=float, default=0.05)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--retrying", type=int, default=0, help="N requests at once, retrying 503s")
    parser.add_argument("--queue-limit", type=int, default=16, help="with --retrying: the server's limit")
    args = parser.parse_args()
    if args.retrying:
        result = run_retrying(args.retrying, args.queue_limit, args.load_delay)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{result['requests']} requests at once, 503s retried every 0.5 s, --queue-limit {result['queue_limit']}, "
                  f"loads {args.load_delay * 1000:.0f} ms: {result['swaps']} swaps in {result['wall_s']:.1f} s, "
                  f"{result['refused_503']} 503s, {result['lost']} lost, {result['wrong_model']} wrong")  # fmt: skip
        return
    report = run(args.requests, [int(x) for x in args.levels.split(",")], args.load_delay)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"OpenAI proxy under load: {args.requests} chat requests per level alternating two models in one "
          f"exclusive group (each load {args.load_delay * 1000:.0f} ms), server in its own process")  # fmt: skip
    print(
        f"{'clients':>8} {'req/s':>8} {'p50':>9} {'p95':>9} {'p99':>9} {'swaps':>6} {'lost':>5} {'wrong':>6}"
    )
    for r in report["levels"]:
        print(f"{r['concurrency']:>8} {r['requests_per_s']:>8.1f} {r['p50_ms']:>7.1f}ms {r['p95_ms']:>7.1f}ms "
              f"{r['p99_ms']:>7.1f}ms {r['swaps']:>6} {r['lost']:>5} {r['wrong_model']:>6}")  # fmt: skip
    if os.environ.get("MODELMORA_LOAD_STRICT") and any(
        r["lost"] or r["wrong_model"] for r in report["levels"]
    ):
        sys.exit(1)


if __name__ == "__main__":
    main()
