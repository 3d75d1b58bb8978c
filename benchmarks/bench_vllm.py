"""The vLLM-in-Docker provider on a real Docker engine.

    python benchmarks/bench_vllm.py [--repeat 3] [--json]

1. The llama.cpp server in a container (tiny GGUF): cold start (create + start + ready),
   stop, and restart from a stopped container, through the manager vs the same docker SDK
   calls and readiness polling done by hand, interleaved in one run.
2. The vLLM stand-in (cold start slowed to MODELMORA_STANDIN_LOAD_DELAY=3 s, wake to
   0.2 s, as vLLM's are minutes vs seconds): waking from sleep vs a cold start.
Uses $DOCKER_HOST, or starts a private dockerd (root) for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio
import docker
import httpx

from modelmora import ModelManager
from modelmora.memory import StaticProbe
from modelmora.net import free_port
from modelmora.testing.docker import PrivateDockerd, host_image, host_mounts
from modelmora.testing.gguf import make_tiny_gguf


def wait_ready(url: str) -> None:
    while True:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def by_hand(client: Any, image: str, model: Path, port: int) -> dict[str, float]:
    mounts = {p: {"bind": m.split(":")[0], "mode": "ro"} for p, m in host_mounts(model.parent).items()}
    t = time.perf_counter()
    c = client.containers.create(
        image, ["--model", str(model), "--host", "127.0.0.1", "--port", str(port)],
        entrypoint=[sys.executable, "-m", "llama_cpp.server"], volumes=mounts, network_mode="host", detach=True,
    )  # fmt: skip
    c.start()
    wait_ready(f"http://127.0.0.1:{port}")
    cold = time.perf_counter() - t
    t = time.perf_counter()
    c.stop(timeout=10)
    stop = time.perf_counter() - t
    t = time.perf_counter()
    c.start()
    wait_ready(f"http://127.0.0.1:{port}")
    restart = time.perf_counter() - t
    c.stop(timeout=10)
    c.remove(force=True)
    return {"cold_start": cold, "stop": stop, "restart_from_stopped": restart}


async def managed(url: str, image: str, model: Path, port: int) -> dict[str, float]:
    spec = {
        "provider": "vllm", "target": str(model), "memory": "1GB",
        "options": {"image": image, "port": port, "served_name": str(model), "health": "/v1/models",
                    "entrypoint": [sys.executable, "-m", "llama_cpp.server"],
                    "command": ["--model", "${MODEL}", "--host", "127.0.0.1", "--port", "${PORT}"],
                    "volumes": host_mounts(model.parent)},
    }  # fmt: skip
    cfg = {"providers": {"vllm": {"docker_url": url, "gpus": None, "hf_cache": None, "keep_stopped": True,
                                  "poll_interval": 0.1, "stop_grace": "10s"}}, "models": {"tiny": spec}}  # fmt: skip
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        t = time.perf_counter()
        await mm.load("tiny")
        cold = time.perf_counter() - t
        t = time.perf_counter()
        await mm.unload("tiny")
        stop = time.perf_counter() - t
        t = time.perf_counter()
        await mm.load("tiny")
        restart = time.perf_counter() - t
        await mm.unload("tiny")
    with contextlib.closing(docker.DockerClient(base_url=url)) as client:
        client.containers.get("modelmora-vllm-tiny").remove(force=True)
    return {"cold_start": cold, "stop": stop, "restart_from_stopped": restart}


async def wake_vs_cold(url: str, image: str) -> dict[str, float]:
    port = free_port()
    spec = {
        "provider": "vllm", "target": "Qwen/Qwen2.5-7B-Instruct", "memory": "8GB", "warm_tier": True,
        "options": {"image": image, "port": port, "entrypoint": [sys.executable, "-m", "modelmora.testing.vllm"],
                    "volumes": host_mounts(),
                    "env": {"MODELMORA_STANDIN_LOAD_DELAY": "3", "MODELMORA_STANDIN_WAKE_DELAY": "0.2"}},
    }  # fmt: skip
    cfg = {"budgets": {"cuda:0": "16GB"}, "providers": {"vllm": {"docker_url": url, "gpus": None, "hf_cache": None,
           "poll_interval": 0.1, "stop_grace": "5s"}}, "models": {"qwen": spec}}  # fmt: skip
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        t = time.perf_counter()
        await mm.load("qwen")
        cold = time.perf_counter() - t
        t = time.perf_counter()
        await mm.park("qwen")
        sleep = time.perf_counter() - t
        t = time.perf_counter()
        await mm.load("qwen")  # wakes
        wake = time.perf_counter() - t
        await mm.unload("qwen")
    return {"cold_start": cold, "sleep": sleep, "wake": wake}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    engine = None
    url = os.environ.get("DOCKER_HOST")
    if not url:
        engine = PrivateDockerd().start()
        url = engine.url
    try:
        with (
            contextlib.closing(docker.DockerClient(base_url=url)) as client,
            tempfile.TemporaryDirectory() as tmp,
        ):
            image = host_image(client)
            model = make_tiny_gguf(Path(tmp) / "tiny.gguf")
            hand, mine = [], []
            for _ in range(args.repeat):
                hand.append(by_hand(client, image, model, free_port()))
                mine.append(anyio.run(managed, url, image, model, free_port()))
            standin = [anyio.run(wake_vs_cold, url, image) for _ in range(args.repeat)]
    finally:
        if engine is not None:
            engine.stop()
    report: dict[str, Any] = {"llama_cpp_container": {}, "vllm_standin": {}}
    for key in ("cold_start", "stop", "restart_from_stopped"):
        raw, ours = statistics.median(h[key] for h in hand), statistics.median(m[key] for m in mine)
        report["llama_cpp_container"][key] = {"by_hand": raw, "manager": ours, "overhead": ours - raw}
    for key in ("cold_start", "sleep", "wake"):
        report["vllm_standin"][key] = statistics.median(s[key] for s in standin)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"llama.cpp server in a container (tiny GGUF), median of {args.repeat}")
    print(f"{'':22} {'by hand':>9} {'manager':>9} {'overhead':>10}")
    for key, r in report["llama_cpp_container"].items():
        print(f"{key:22} {r['by_hand']:>8.3f}s {r['manager']:>8.3f}s {r['overhead'] * 1000:>+8.0f}ms")
    s = report["vllm_standin"]
    print(f"\nvLLM stand-in (cold start 3 s, wake 0.2 s by configuration): cold {s['cold_start']:.2f}s, "
          f"sleep {s['sleep']:.2f}s, wake {s['wake']:.2f}s")  # fmt: skip


if __name__ == "__main__":
    main()
