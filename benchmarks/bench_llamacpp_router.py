"""llama.cpp's own router vs ``modelmora serve`` over the ``llamacpp`` provider, on the same
C++ ``llama-server``, the same GGUFs and the same request trace.

    python benchmarks/bench_llamacpp_router.py [--models 3] [--requests 120] [--rounds 2] [--json]
                                               [--policies cost,lru]

Three random-weight F32 GGUFs of ~128 MB (``make_tiny_gguf``; ~150 MB RSS each once served)
and room for two: the router runs with ``--models-max 2``; modelmora with a CPU budget of
340 MB, so admission evicts.  The trace (fixed seed) is sequential, from one keep-alive
client, ``/v1/completions`` with 4 tokens: an agent loop (one model called many times in a
row with short detours to a second), bursts on one model, and uniform random picks.
Rounds alternate the systems so drift hits all alike; ``--policies`` runs modelmora once per
``eviction`` policy named (default: ``cost``, the default policy; ``cost,lru`` adds LRU).  Reported per system: loads
(server processes spawned), p50/p95 latency, mean time per request, peak RSS of all
server processes (the manager's own process included for modelmora), requests retried
(the client retries a failed connection twice, as the official OpenAI clients do; the
retry's time counts in that request's latency) and requests that failed even so.
Needs the binary from ``bash .ci/setup-llama-server.sh`` (or $MODELMORA_LLAMA_SERVER).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import httpx
import psutil

from modelmora.net import free_port
from modelmora.providers.llamacpp import find_llama_server
from modelmora.testing.gguf import make_tiny_gguf
from modelmora.testing.traces import agent_bursts_random

SERVER_ARGS = ["--ctx-size", "256", "--parallel", "1", "-ngl", "0"]


class RssSampler:
    """Peak of the summed RSS of ``root`` and all its descendants, sampled every 20 ms."""

    def __init__(self, root: int):
        self.root, self.peak, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                proc = psutil.Process(self.root)
                total = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


RETRIES = 2  # what the official OpenAI clients do on a connection error (max_retries=2)


def drive(base: str, requests: list[str], root: int) -> dict[str, Any]:
    """Send the trace as one keep-alive client that, like the official OpenAI clients,
    retries a request whose connection failed (up to ``RETRIES`` times): a request's
    latency runs from its first attempt to its answer."""
    latencies, failed, retried = [], 0, 0
    errors: collections.Counter[str] = collections.Counter()  # every failed attempt, by kind
    with httpx.Client(base_url=base, timeout=120) as client, RssSampler(root) as rss:
        started = time.perf_counter()
        for model in requests:
            t0 = time.perf_counter()
            ok = False
            for attempt in range(RETRIES + 1):
                try:
                    reply = client.post(
                        "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4}
                    )
                except httpx.TransportError as exc:
                    errors[type(exc).__name__] += 1
                    retried += attempt < RETRIES
                    continue
                ok = reply.status_code == 200
                if not ok:
                    errors[f"{reply.status_code} {reply.text[:120]}"] += 1
                break
            latencies.append(time.perf_counter() - t0)
            failed += not ok
        total = time.perf_counter() - started
    in_order = [round(x * 1000, 2) for x in latencies]
    latencies.sort()
    return {
        "latencies_ms": in_order,  # per request, in trace order (--json)
        "mean_ms": total / len(requests) * 1000,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))] * 1000,
        "peak_rss_mb": rss.peak / 1e6,
        "failed": failed,
        "retried": retried,
        "errors": dict(errors),
    }


def proxy_overhead(base: str, root: int, model: str, n: int = 100) -> dict[str, float]:
    """The same 1-token request to a resident model, in turn straight to its llama-server,
    through a byte relay (``tcp_relay.py``: the floor under any Python hop), through the
    bare baseline (``bare_proxy.py``: uvicorn + aiohttp, nothing else) and through
    modelmora's proxy: medians and p95 of each, in ms."""
    port = None
    for child in psutil.Process(root).children(recursive=True):
        cmdline = child.cmdline()
        if "--alias" in cmdline and cmdline[cmdline.index("--alias") + 1] == model:
            port = cmdline[cmdline.index("--port") + 1]
    assert port is not None, f"{model} is not resident"
    here = Path(__file__).parent
    ports = {"relay": free_port(), "bare": free_port()}
    helpers = [
        subprocess.Popen([sys.executable, str(here / "tcp_relay.py"), port, str(ports["relay"])], start_new_session=True),
        subprocess.Popen([sys.executable, str(here / "bare_proxy.py"), f"http://127.0.0.1:{port}", str(ports["bare"])],
                         start_new_session=True),  # stop() signals its process group
    ]  # fmt: skip
    body = {"model": model, "prompt": "Hello", "max_tokens": 1}
    times: dict[str, list[float]] = {"direct": [], "relay": [], "bare": [], "proxy": []}
    try:
        for name in ("relay", "bare"):
            wait_http(f"http://127.0.0.1:{ports[name]}/health")
        with contextlib.ExitStack() as stack:
            urls = {"direct": f"http://127.0.0.1:{port}", "relay": f"http://127.0.0.1:{ports['relay']}",
                    "bare": f"http://127.0.0.1:{ports['bare']}", "proxy": base}  # fmt: skip
            clients = {name: stack.enter_context(httpx.Client(base_url=url, timeout=60)) for name, url in urls.items()}
            for client in [*clients.values()] * 2:  # warm every connection
                client.post("/v1/completions", json=body)
            for _ in range(n):
                for name, client in clients.items():
                    t0 = time.perf_counter()
                    client.post("/v1/completions", json=body).raise_for_status()
                    times[name].append((time.perf_counter() - t0) * 1000)
    finally:
        for helper in helpers:
            stop(helper)
    out = {}
    for name, values in times.items():
        values.sort()
        out[f"{name}_p50_ms"] = statistics.median(values)
        out[f"{name}_p95_ms"] = values[int(0.95 * (n - 1))]
    return out


def run_router(binary: str, folder: Path, requests: list[str], work: Path) -> dict[str, Any]:
    port = free_port()
    log = work / f"router-{port}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [binary, "--models-dir", str(folder), "--models-max", "2", "--port", str(port), *SERVER_ARGS],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/models")
        result = drive(f"http://127.0.0.1:{port}", requests, proc.pid)
    finally:
        stop(proc)
    result["loads"] = log.read_text(errors="replace").count("spawning server instance with name=")
    return result


def run_modelmora(
    binary: str, folder: Path, names: list[str], requests: list[str], work: Path, eviction: str = "cost"
) -> dict[str, Any]:
    port = free_port()
    state = work / f"mm-state-{port}"
    cfg = {
        "budgets": {"cpu": "340MB"},
        "eviction": eviction,
        "providers": {"llamacpp": {"binary": binary, "state_dir": str(state), "args": SERVER_ARGS}},
        "models": {
            name: {
                "provider": "llamacpp",
                "target": str(folder / f"{name}.gguf"),
                "device": "cpu",
                "keep_alive": "-1",
            }
            for name in names
        },
    }
    config = work / f"modelmora-{port}.json"
    config.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env["MODELMORA_HOME"] = str(work / f"home-{port}")  # its state (HTTP leases) stays in the run's folder
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelmora.cli", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=(work / f"serve-{port}.log").open("wb"), env=env, start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        result = drive(f"http://127.0.0.1:{port}", requests, proc.pid)
        result["proxy"] = proxy_overhead(f"http://127.0.0.1:{port}", proc.pid, requests[-1])
        httpx.post(f"http://127.0.0.1:{port}/unload-all", timeout=60)
    finally:
        stop(proc)
    result["loads"] = len(list(state.glob("*.log")))  # one log file per server started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--policies", default="cost", help="modelmora's eviction policies to run, comma-separated.")
    args = parser.parse_args()
    policies = [p for p in args.policies.split(",") if p]
    if not policies or any(p not in ("cost", "lru") for p in policies):
        parser.error("--policies: cost, lru or both, comma-separated")
    binary = find_llama_server()
    if binary is None:
        sys.exit("no llama-server: bash .ci/setup-llama-server.sh or set MODELMORA_LLAMA_SERVER")
    names = [f"m{i}" for i in range(args.models)]
    requests = agent_bursts_random(names, args.requests)
    systems = {f"modelmora serve, {p}": p for p in policies}
    results: dict[str, list[dict[str, Any]]] = {"llama.cpp router": [], **{s: [] for s in systems}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "models"
        for i, name in enumerate(names):
            make_tiny_gguf(folder / f"{name}.gguf", layers=3, hidden=1024, seed=i)
        for _ in range(args.rounds):
            results["llama.cpp router"].append(run_router(binary, folder, requests, work))
            for system, policy in systems.items():
                results[system].append(run_modelmora(binary, folder, names, requests, work, policy))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{len(requests)} sequential requests over {args.models} models (~128 MB GGUFs, room for 2), "
          f"{args.rounds} rounds each, alternating")  # fmt: skip
    print("| system | loads | mean ms/request | p50 ms | p95 ms | peak RSS MB | retried | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for system, runs in results.items():
        for r in runs:
            print(
                f"| {system} | {r['loads']} | {r['mean_ms']:.0f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
                f"| {r['peak_rss_mb']:.0f} | {r['retried']} | {r['failed']} |"
            )
    for system, runs in results.items():
        for r in runs:
            for why, count in r["errors"].items():
                print(f"{system}: {count}x {why}")
    print("\nproxy overhead on a resident model (1-token completion, in turn, p50 ms; relay = tcp_relay.py, "
          "bare = bare_proxy.py):")  # fmt: skip
    print("| round | direct | relay | bare proxy | modelmora | added: relay | added: bare | added: modelmora | modelmora p95 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results[next(iter(systems))], 1):
        o = r["proxy"]
        d = o["direct_p50_ms"]
        print(
            f"| {i} | {d:.1f} | {o['relay_p50_ms']:.1f} | {o['bare_p50_ms']:.1f} | {o['proxy_p50_ms']:.1f} "
            f"| {o['relay_p50_ms'] - d:+.2f} | {o['bare_p50_ms'] - d:+.2f} | {o['proxy_p50_ms'] - d:+.2f} "
            f"| {o['proxy_p95_ms']:.1f} |"
        )

if __name__ == "__main__":
    main()
