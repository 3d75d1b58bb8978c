"""Ollama places its own runners; the provider reports where they landed (issue 23,
item 3): the runner under ``ollama serve`` is found by its weights blob (or as the one the
load started), and NVML's per-process bytes say which GPU(s) it is on.  Tested with a fake
process table and a fake NVML reading; the real check is ``gpu``-marked."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping

import httpx
import pytest

from modelmora import ModelManager
from modelmora.memory import DeviceMemory, MemoryProbe, NvmlProbe
from modelmora.providers.ollama import OllamaProvider, OllamaSettings
from modelmora.providers.ollama_runners import Landed, RunnerLocator, blob_digests
from modelmora.testing.ollama import OllamaEmulator

GB = 10**9
BLOB_A = "a" * 64
BLOB_B = "b" * 64
SERVER = 100


class FakeTable:
    """``ollama serve`` (pid 100) with the runners ``runners()`` returns at each call."""

    def __init__(self, runners: Callable[[], Mapping[int, tuple[str, ...]]]):
        self._runners = runners

    def servers(self) -> list[int]:
        return [SERVER]

    def descendants(self, pid: int) -> dict[int, tuple[str, ...]]:
        return dict(self._runners()) if pid == SERVER else {}


class FakeNvml(MemoryProbe):
    """NVML's per-process bytes: device → {pid: bytes}."""

    source = "nvml"

    def __init__(self, held: Mapping[str, Mapping[int, int]]):
        self.held = held

    def read(self) -> list[DeviceMemory]:
        return [
            DeviceMemory(d, 80 * GB, sum(p.values()), 80 * GB - sum(p.values()), "nvml", processes=dict(p))
            for d, p in self.held.items()
        ]


def runner(blob: str) -> tuple[str, ...]:
    return (
        "/usr/bin/ollama",
        "runner",
        "--model",
        f"/root/.ollama/models/blobs/sha256-{blob}",
        "--port",
        "1",
    )


def test_the_runner_naming_the_models_blob_is_its_runner() -> None:
    table = FakeTable(lambda: {201: runner(BLOB_A), 202: runner(BLOB_B)})
    nvml = FakeNvml({"cuda:0": {202: 3 * GB, 999: GB}, "cuda:1": {201: 9 * GB}})
    landed = RunnerLocator(table, nvml).locate(before={201, 202}, blobs={BLOB_A})
    assert landed is not None and landed.memory == {"cuda:1": 9 * GB} and landed.pids == (201,)
    assert "cuda:1 9.0 GB" in landed.describe() and "weights blob" in landed.describe()


def test_else_the_runner_the_load_started_and_a_runner_spread_over_two_gpus() -> None:
    table = FakeTable(lambda: {201: runner(BLOB_B), 203: ("/usr/bin/ollama", "runner", "--port", "2")})
    nvml = FakeNvml({"cuda:0": {203: 6 * GB}, "cuda:2": {203: 2 * GB, 201: GB}})
    landed = RunnerLocator(table, nvml).locate(before={201}, blobs=set())
    assert landed is not None and landed.memory == {"cuda:0": 6 * GB, "cuda:2": 2 * GB}
    assert "started during the load" in landed.describe()
    assert landed.split(7) == {"cuda:0": 5, "cuda:2": 2}  # /api/ps's VRAM in NVML's proportions
    assert sum(landed.split(8 * GB + 1).values()) == 8 * GB + 1


def test_nothing_is_reported_without_a_runner_or_without_nvml() -> None:
    table = FakeTable(lambda: {201: runner(BLOB_A)})
    assert RunnerLocator(table, FakeNvml({})).locate(before=set(), blobs={BLOB_A}) is None  # no NVML
    assert RunnerLocator(table, FakeNvml({"cuda:0": {201: GB}})).locate(before={201}, blobs={BLOB_B}) is None


def test_blob_digests_come_from_the_modelfile() -> None:
    show = {
        "modelfile": f"# Modelfile\nFROM /usr/share/ollama/.ollama/models/blobs/sha256-{BLOB_A}\nTEMPLATE x"
    }
    assert blob_digests(show) == {BLOB_A}
    assert blob_digests({"modelfile": "FROM qwen2.5:14b\n"}) == set()


@pytest.mark.anyio
async def test_an_ollama_model_is_counted_and_shown_where_its_runner_landed(
    make_ollama: Callable[..., OllamaEmulator],
) -> None:
    emu = make_ollama()
    # the emulator has no processes: a runner (pid 300) exists while it lists the model,
    # and NVML sees it on cuda:1, which Ollama chose
    table = FakeTable(lambda: {300: ("/usr/bin/ollama", "runner", "--port", "3")} if emu.loaded() else {})
    provider = OllamaProvider("ollama", OllamaSettings(base_url=emu.url, locate_runners=True))
    provider.locator = RunnerLocator(table, FakeNvml({"cuda:1": {300: 9 * GB}}))
    config = {
        "budgets": {"cuda:0": "24GB", "cuda:1": "24GB"},
        "models": {"qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"}},
    }
    async with provider, ModelManager(config, providers={"ollama": provider}) as mm:
        handle = await mm.load("qwen")
        assert set(handle.memory) == {"cuda:1"} and handle.memory["cuda:1"] > 0, handle.memory
        row = next(m for m in (await mm.status()).models if m.name == "qwen")
        assert row.devices == ["cuda:1"] and "Ollama placed it" in row.placement, row
        assert set(row.memory) == {"cuda:1"}, row.memory
        await mm.reconcile()  # /api/ps alone says nothing of devices: the landing is kept
        row = next(m for m in (await mm.status()).models if m.name == "qwen")
        assert set(row.memory) == {"cuda:1"}, row.memory
        await mm.unload("qwen")


def test_an_ollama_elsewhere_is_not_looked_for_here() -> None:
    assert OllamaProvider("o", OllamaSettings(base_url="http://10.0.0.2:11434")).locator is None
    assert OllamaProvider("o", OllamaSettings(base_url="http://127.0.0.1:11434")).locator is not None
    off = OllamaSettings(base_url="http://127.0.0.1:11434", locate_runners=False)
    assert OllamaProvider("o", off).locator is None


@pytest.mark.gpu
@pytest.mark.anyio
async def test_a_real_ollama_runner_is_found_on_its_gpu() -> None:
    """On a machine with an NVIDIA GPU and a local ``ollama serve`` that has
    ``MODELMORA_GPU_OLLAMA_MODEL`` (default ``qwen2.5:0.5b``) pulled: the runner is found
    and NVML's bytes for it are on a GPU, within the provider's estimate ±50 % (the CUDA
    context and Ollama's graph reserve are not in /api/ps's figure)."""
    probe = NvmlProbe()
    gpus = probe.read()
    probe.close()
    if not gpus:
        pytest.skip("needs an NVIDIA GPU and driver (NVML lists none here)")
    if shutil.which("ollama") is None:
        pytest.skip("needs the ollama binary and a running `ollama serve` on this machine")
    url = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
    url = url if url.startswith("http") else f"http://{url}"
    target = os.environ.get("MODELMORA_GPU_OLLAMA_MODEL", "qwen2.5:0.5b")
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            tags = (await client.get(f"{url}/api/tags")).json().get("models") or []
    except httpx.HTTPError:
        pytest.skip(f"no ollama serve answers at {url}")
    if not any(str(m.get("name", "")).startswith(target) for m in tags):
        pytest.skip(f"{target} is not pulled: ollama pull {target}")
    config = {"providers": {"ollama": {"base_url": url, "locate_runners": True}},
              "models": {"m": {"provider": "ollama", "target": target}}}  # fmt: skip
    async with ModelManager(config) as mm:
        handle = await mm.load("m")
        try:
            assert handle.placement, "the runner was not found under ollama serve, or NVML does not list it"
            gpu = {d: n for d, n in handle.memory.items() if d.startswith("cuda:")}
            assert gpu, handle.memory
            estimate = sum(mm.spec("m").memory.values()) or sum(handle.memory.values())
            assert 0.5 * estimate <= sum(handle.memory.values()) <= 1.5 * estimate, (handle.memory, estimate)
        finally:
            await mm.unload("m")


def test_landed_split_of_nothing_is_nothing() -> None:
    assert Landed({"cuda:0": GB}, (1,), "x").split(0) == {}
