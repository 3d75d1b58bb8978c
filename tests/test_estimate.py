"""Estimates from model files (issue 23): the GGUF tensor table and KV formula,
safetensors headers, shards and diffusers folders, bad files, Ollama's /api/show, the
providers' prepare() and the `modelmora estimate` command."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from modelmora.cli import app
from modelmora.errors import ModelFileError
from modelmora.estimate import (
    FILE_SIZE_ONLY,
    cache_type_bytes,
    gguf_estimate,
    ollama_estimate,
    safetensors_estimate,
    vllm_estimate,
)
from modelmora.providers.llamacpp import LlamaCppProvider, find_llama_server
from modelmora.spec import ModelSpec
from modelmora.testing.gguf import make_tiny_gguf
from modelmora.testing.ollama import OllamaEmulator

VOCAB = 3 + 256 + 8  # make_tiny_gguf's vocabulary: 3 control tokens, 256 bytes, 8 words
runner = CliRunner()


def tensor_shapes(layers: int, hidden: int, heads: int, kv_heads: int, ff: int) -> dict[str, tuple[int, int]]:
    """make_tiny_gguf's tensors as (rows, columns); norms are (1, hidden)."""
    kv = kv_heads * hidden // heads
    shapes = {"token_embd": (VOCAB, hidden), "output_norm": (1, hidden), "output": (VOCAB, hidden)}
    for i in range(layers):
        shapes |= {
            f"{i}.attn_norm": (1, hidden), f"{i}.attn_q": (hidden, hidden), f"{i}.attn_k": (kv, hidden),
            f"{i}.attn_v": (kv, hidden), f"{i}.attn_output": (hidden, hidden), f"{i}.ffn_norm": (1, hidden),
            f"{i}.ffn_gate": (ff, hidden), f"{i}.ffn_up": (ff, hidden), f"{i}.ffn_down": (hidden, ff),
        }  # fmt: skip
    return shapes


# -- GGUF ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("weight_type", "block", "block_bytes"), [("F32", 1, 4), ("F16", 1, 2), ("Q8_0", 32, 34), ("Q4_0", 32, 18)])  # fmt: skip
def test_gguf_weights_are_the_tensor_table_per_type(tmp_path: Path, weight_type: str, block: int, block_bytes: int) -> None:  # fmt: skip
    path = make_tiny_gguf(tmp_path / "m.gguf", layers=3, hidden=128, heads=4, kv_heads=2, ff=256, weight_type=weight_type)  # fmt: skip
    expected = 0
    for name, (rows, cols) in tensor_shapes(3, 128, 4, 2, 256).items():
        if rows == 1 or name == "token_embd":  # norms and the embedding stay F32
            expected += rows * cols * 4
        else:
            expected += rows * cols // block * block_bytes
    estimate = gguf_estimate(path, ctx=256, parallel=1)
    assert estimate.weights == expected
    assert expected < path.stat().st_size < expected + 64 * 1024  # the rest is the header
    assert weight_type in estimate.basis and not estimate.file_size_only


def test_kv_cache_is_layers_cells_kv_width_two_and_the_cache_type(tmp_path: Path) -> None:
    path = make_tiny_gguf(tmp_path / "gqa.gguf", layers=3, hidden=256, heads=8, kv_heads=2, context=2048)
    kv_width = 2 * 256 // 8  # KV heads × head size
    f16 = gguf_estimate(path, ctx=1000, parallel=1)  # padded to 1024 cells
    assert f16.kv_cache == 3 * 1024 * kv_width * 2 * 2
    assert f16.context == 1024
    q8 = gguf_estimate(path, ctx=1024, parallel=1, cache_type_k="q8_0", cache_type_v="q8_0")
    assert q8.kv_cache == int(3 * 1024 * kv_width * 2 * 34 / 32)
    trained = gguf_estimate(path)  # llama-server's default: the trained context, 4 slots
    assert trained.context == 2048 and trained.parallel == 4
    assert trained.kv_cache == 2 * f16.kv_cache
    assert cache_type_bytes("f32") == 4 and cache_type_bytes("bf16") == 2
    with pytest.raises(ValueError, match="unknown KV cache type"):
        cache_type_bytes("f12")


def test_sliding_window_layers_hold_the_window_not_the_context(tmp_path: Path) -> None:
    path = make_tiny_gguf(tmp_path / "g2.gguf", layers=4, hidden=128, heads=4, context=8192, arch="gemma2", sliding_window=128)  # fmt: skip
    per_cell = 128 * 2 * 2  # K and V, f16, 4 heads × 32
    estimate = gguf_estimate(path, ctx=4096, parallel=1)
    # gemma2: of every 2 layers the first is sliding-window; its cache is min(ctx, window + n_ubatch) padded to 256
    assert estimate.kv_cache == 2 * 4096 * per_cell + 2 * 768 * per_cell
    assert "2 sliding-window of 128" in estimate.basis


def test_buffers_grow_with_the_context_and_the_micro_batch(tmp_path: Path) -> None:
    path = make_tiny_gguf(tmp_path / "m.gguf", layers=2, hidden=128, heads=4, context=8192)
    small, large = (gguf_estimate(path, ctx=n, parallel=1) for n in (1024, 4096))
    assert large.buffers - small.buffers == (4096 - 1024) * 512 * 2  # the f16 attention mask
    no_flash = gguf_estimate(path, ctx=1024, parallel=1, flash_attn=False)
    assert no_flash.buffers - small.buffers == 1024 * 512 * 4 * 4  # scores: cells × ubatch × heads × 4 B
    assert gguf_estimate(path, ctx=1024, parallel=1, ubatch=256).buffers < small.buffers


def test_an_architecture_the_formula_does_not_know_is_file_size_only(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "mystery.gguf"
    writer = gguf.GGUFWriter(str(path), "mystery")
    writer.add_tensor("w", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    estimate = gguf_estimate(path, ctx=4096)
    assert estimate.file_size_only and estimate.basis.startswith(FILE_SIZE_ONLY)
    assert estimate.total == path.stat().st_size and estimate.kv_cache == 0
    rwkv = make_tiny_gguf(tmp_path / "rwkv.gguf", layers=2, hidden=64, heads=4, arch="rwkv7")
    assert gguf_estimate(rwkv).file_size_only


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_bad_gguf_is_one_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    good = make_tiny_gguf(tmp_path / "good.gguf", layers=2, hidden=64, heads=4)
    bad = tmp_path / f"{damage}.gguf"
    data = good.read_bytes()
    bad.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"GGUF" + b"\xff" * 64, "empty": b""}[damage]
    )
    with pytest.raises(ModelFileError) as caught:
        gguf_estimate(bad)
    assert str(bad) in str(caught.value)
    assert "\n" not in str(caught.value)


# -- safetensors --------------------------------------------------------------------------


def save(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_safetensors_bytes_per_dtype_as_stored_and_as_asked(tmp_path: Path) -> None:
    path = save(tmp_path / "model.safetensors", {
        "a": np.zeros((100, 30), np.float32), "b": np.zeros((50,), np.float16), "ids": np.zeros((7,), np.int64),
    })  # fmt: skip
    assert safetensors_estimate(path).weights == 3000 * 4 + 50 * 2 + 7 * 8
    assert safetensors_estimate(path, dtype="float16").weights == 3050 * 2 + 7 * 8  # ints keep their size
    assert safetensors_estimate(tmp_path).weights == 3000 * 4 + 50 * 2 + 7 * 8  # the folder
    with pytest.raises(ValueError, match="unknown dtype"):
        safetensors_estimate(path, dtype="float13")


def test_a_sharded_checkpoint_is_the_sum_of_the_shards_its_index_names(tmp_path: Path) -> None:
    save(tmp_path / "model-00001-of-00002.safetensors", {"a": np.zeros((1000,), np.float32)})
    save(tmp_path / "model-00002-of-00002.safetensors", {"b": np.zeros((500,), np.float32)})
    save(tmp_path / "stray.safetensors", {"c": np.zeros((99999,), np.float32)})  # not in the index
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    estimate = safetensors_estimate(tmp_path)
    assert estimate.weights == 1500 * 4
    assert len(estimate.fields["files"]) == 2


def test_a_diffusers_pipeline_is_the_sum_of_its_components_in_float32(tmp_path: Path) -> None:
    save(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", {"w": np.zeros((1000,), np.float16)})
    save(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", {"w": np.zeros((300,), np.float16)})
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{}")
    index = {"_class_name": "X", "unet": ["diffusers", "U"], "vae": ["diffusers", "V"], "scheduler": ["diffusers", "S"]}  # fmt: skip
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert safetensors_estimate(tmp_path).weights == 1300 * 4  # diffusers loads float32 unless told
    assert safetensors_estimate(tmp_path, dtype="float16").weights == 1300 * 2


@pytest.mark.parametrize("damage", ["truncated", "huge header", "not json"])
def test_a_bad_safetensors_header_is_one_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    good = save(tmp_path / "good.safetensors", {"a": np.zeros((1000,), np.float32)})
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({
        "truncated": data[:-100],
        "huge header": (10**9).to_bytes(8, "little") + data[8:],
        "not json": (8).to_bytes(8, "little") + b"{{{{{{{{",
    }[damage])  # fmt: skip
    with pytest.raises(ModelFileError) as caught:
        safetensors_estimate(bad)
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_a_folder_without_safetensors_says_so(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 10)
    with pytest.raises(ModelFileError, match="no safetensors"):
        safetensors_estimate(tmp_path)


# -- Ollama and vLLM ----------------------------------------------------------------------


def test_the_emulators_api_show_answers_as_ollama_does() -> None:
    with OllamaEmulator(strict=True, vram="24GiB", models={"qwen2.5:14b": "9GB"}) as ollama:
        shown = httpx.post(f"{ollama.url}/api/show", json={"model": "qwen2.5:14b"}).json()
    info = shown["model_info"]
    arch = info["general.architecture"]
    for key in (
        "context_length",
        "block_count",
        "embedding_length",
        "attention.head_count",
        "attention.head_count_kv",
    ):
        assert isinstance(info[f"{arch}.{key}"], int) and info[f"{arch}.{key}"] > 0
    assert info["general.parameter_count"] == 7_000_000_000  # the catalogue's parameter_size "7B"
    assert info["tokenizer.ggml.tokens"] is None  # arrays only with verbose
    assert shown["details"]["quantization_level"] == "Q4_K_M"
    assert {"modelfile", "parameters", "template", "capabilities", "modified_at"} <= set(shown)


@pytest.mark.parametrize(("num_ctx", "parallel"), [(2048, 1), (8192, 2)])
def test_the_ollama_estimate_matches_what_the_emulator_reports_in_ps(num_ctx: int, parallel: int) -> None:
    models = {"qwen2.5:14b": {"size": "9GB", "context_length": 32768, "block_count": 48, "head_count": 40, "head_count_kv": 8, "embedding_length": 5120}}  # fmt: skip
    with OllamaEmulator(
        strict=True, vram="80GiB", models=models, environ={"OLLAMA_NUM_PARALLEL": str(parallel)}
    ) as ollama:
        shown = httpx.post(f"{ollama.url}/api/show", json={"model": "qwen2.5:14b"}).json()
        httpx.post(f"{ollama.url}/api/generate", json={"model": "qwen2.5:14b", "options": {"num_ctx": num_ctx}, "stream": False})  # fmt: skip
        (ps,) = httpx.get(f"{ollama.url}/api/ps").json()["models"]
    estimate = ollama_estimate(shown, weights=9_000_000_000, num_ctx=num_ctx, parallel=parallel)
    assert estimate.kv_cache == 2 * 48 * 8 * 128 * 2 * num_ctx * parallel
    assert estimate.total == ps["size"]


def test_vllm_preallocates_its_fraction_of_the_device() -> None:
    assert vllm_estimate(0.5, 80 * 10**9).total == 40 * 10**9
    with pytest.raises(ValueError):
        vllm_estimate(1.5, 80 * 10**9)


# -- providers ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_llamacpp_prepare_fills_an_empty_memory_and_keeps_a_given_one(tmp_path: Path) -> None:
    path = make_tiny_gguf(tmp_path / "m.gguf", layers=2, hidden=128, heads=4, context=4096)
    provider = LlamaCppProvider("llamacpp")
    bare = ModelSpec(name="m", provider="llamacpp", target=str(path), device="cpu", options={"ctx_size": 2048, "parallel": 2})  # fmt: skip
    prepared = await provider.prepare(bare)
    expected = gguf_estimate(path, ctx=2048, parallel=2)
    assert prepared.memory == {"cpu": expected.total}
    given = await provider.prepare(bare.model_copy(update={"memory": {"cpu": 123}}))
    assert given.memory == {"cpu": 123}  # the registry's figure stands; the estimate is shown beside it
    assert provider.estimates["m"].total == expected.total


# -- the command --------------------------------------------------------------------------


def test_estimate_command_json_for_a_gguf(tmp_path: Path) -> None:
    path = make_tiny_gguf(tmp_path / "m.gguf", layers=2, hidden=128, heads=4, context=4096)
    result = runner.invoke(app, ["estimate", str(path), "--ctx", "2048", "--parallel", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["estimate"]["total"] == gguf_estimate(path, ctx=2048, parallel=1).total
    assert data["estimate"]["kv_cache"] > 0 and data["devices"]["cpu"]["fits_budget"] in (True, False)


def test_estimate_command_prints_the_breakdown(tmp_path: Path) -> None:
    path = make_tiny_gguf(tmp_path / "m.gguf", layers=2, hidden=128, heads=4, context=4096)
    result = runner.invoke(app, ["estimate", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for word in ("weights", "KV cache", "buffers", "basis", "largest context"):
        assert word in result.stdout


@pytest.mark.parametrize("content", [b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20, b""])
def test_estimate_command_on_a_bad_file_is_one_line_and_exit_1(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    result = runner.invoke(app, ["estimate", str(bad)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and str(bad) in result.output.replace("\n", "")
    missing = runner.invoke(app, ["estimate", str(tmp_path / "nothing.gguf")])
    assert missing.exit_code == 1 and "no such file" in missing.output


def test_estimate_command_says_file_size_only(tmp_path: Path) -> None:
    rwkv = make_tiny_gguf(tmp_path / "rwkv.gguf", layers=2, hidden=64, heads=4, arch="rwkv7")
    result = runner.invoke(app, ["estimate", str(rwkv)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "file size only" in result.stdout


def test_estimate_command_for_a_registry_name(tmp_path: Path) -> None:
    path = make_tiny_gguf(tmp_path / "m.gguf", layers=2, hidden=128, heads=4, context=4096)
    config = tmp_path / "modelmora.yaml"
    config.write_text(
        "budgets: {cpu: 1GB}\n"
        f"providers: {{llamacpp: {{state_dir: {tmp_path / 'state'}}}}}\n"
        f"models:\n  small: {{provider: llamacpp, target: {path}, device: cpu, memory: 5MB}}\n"
    )
    result = runner.invoke(app, ["estimate", "small", "-c", str(config), "--ctx", "1024", "--parallel", "1", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["estimate"]["total"] == gguf_estimate(path, ctx=1024, parallel=1).total
    assert data["registry_memory"] == {"cpu": 5_000_000}
    assert data["devices"]["cpu"]["budget"] == 1_000_000_000
    largest = data["devices"]["cpu"]["largest_context"]
    assert largest == 4096  # the trained context: the budget is far larger
    unknown = runner.invoke(app, ["estimate", "nope", "-c", str(config)])
    assert unknown.exit_code == 1 and "unknown model" in unknown.output


# -- the real llama-server ----------------------------------------------------------------


@pytest.mark.llama
@pytest.mark.parametrize("ctx", [1024, 4096])
def test_the_formula_matches_llama_servers_logged_buffers(tmp_path: Path, ctx: int) -> None:
    binary = find_llama_server()
    if binary is None:
        pytest.skip("no llama-server (bash .ci/setup-llama-server.sh)")
    path = make_tiny_gguf(tmp_path / "m.gguf", layers=4, hidden=384, heads=6, kv_heads=2, context=8192, weight_type="Q8_0")  # fmt: skip
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [binary, "-m", str(path), "-c", str(ctx), "-np", "1", "--port", "0", "-lv", "4"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "compute buffer size" not in log.read_text(errors="replace"):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[
                -2000:
            ]
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(10)
    logged = logged_buffers(log.read_text(errors="replace"))
    estimate = gguf_estimate(path, ctx=ctx, parallel=1)
    assert abs(estimate.weights - logged["model"]) < 0.01 * 2**20  # exact, up to the log's rounding
    assert abs(estimate.kv_cache - logged["KV"]) < 0.01 * 2**20
    compute = (
        estimate.buffers - estimate.fields["vocab"] * 4 - 6 * 2**20
    )  # less the output buffer and the process
    assert abs(compute / logged["compute"] - 1) < 0.15


def logged_buffers(text: str) -> dict[str, float]:
    """MiB per buffer kind from llama-server's own lines, summed over devices, in bytes."""
    out: dict[str, float] = {}
    for kind, mib in re.findall(r"(model|KV|compute|output) buffer size = +([0-9.]+) MiB", text):
        out[kind] = out.get(kind, 0.0) + float(mib) * 2**20
    return out


# -- after the load: the estimate's error -------------------------------------------------


@pytest.mark.anyio
async def test_loaded_events_and_status_carry_the_estimate_and_its_error() -> None:
    from modelmora import ModelManager
    from modelmora import events as ev
    from modelmora.memory import StaticProbe

    config = {
        "budgets": {"cpu": "10GB"},
        "models": {
            "m": {
                "provider": "simulated",
                "device": "cpu",
                "memory": "1GB",
                "options": {"actual_memory": {"cpu": 1_250_000_000}},
            }
        },
    }
    seen: list[ev.Loaded] = []
    async with ModelManager(config, probe=StaticProbe({})) as mm:
        mm.events.subscribe(lambda e: seen.append(e) if isinstance(e, ev.Loaded) else None)
        await mm.load("m")
        (status,) = (await mm.status()).models
    (loaded,) = seen
    assert loaded.estimate == {"cpu": 1_000_000_000} and loaded.memory == {"cpu": 1_250_000_000}
    assert loaded.estimate_error == pytest.approx(0.8)
    assert status.estimate == {"cpu": 1_000_000_000} and status.estimate_error == pytest.approx(0.8)
    assert status.to_dict()["estimate_error"] == pytest.approx(0.8)


@pytest.mark.anyio
async def test_torch_prepare_reads_a_local_folders_safetensors(tmp_path: Path) -> None:
    from modelmora.providers.torch import TorchProvider

    save(tmp_path / "model.safetensors", {"w": np.zeros((1000, 10), np.float32)})
    provider = TorchProvider("torch")
    spec = ModelSpec(
        name="t", provider="torch", target=str(tmp_path), device="cpu", options={"dtype": "float16"}
    )
    prepared = await provider.prepare(spec)
    assert prepared.memory == {"cpu": 10_000 * 2}
    factory = spec.model_copy(update={"target": "package.module:factory", "options": {}})
    assert (await provider.prepare(factory)).memory == {}
    await provider.aclose()
