"""Budgets from what the devices have, ``devices:`` restriction, and the hardware inventory
(``ModelManager.hardware()``, ``GET /hardware``, ``modelmora status --hardware``), on
simulated GPUs: this machine has no NVML."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from modelmora import ConfigError, ModelManager
from modelmora.cli import app as cli
from modelmora.config import ManagerConfig
from modelmora.memory import DeviceMemory, MemoryProbe, StaticProbe
from modelmora.server import create_app
from modelmora.testing.faulty import FaultyProvider
from modelmora.testing.threaded import ThreadedServer

GB = 10**9
GiB = 1 << 30


@pytest.mark.anyio
async def test_a_gpu_without_a_budget_keeps_one_gib_free_by_default() -> None:
    """Like llama.cpp's ``--fit``: with no ``reserve`` configured, 1 GiB of each GPU stays
    out of an automatic budget (CUDA context, the desktop, other runtimes' allocations)."""
    async with ModelManager({}, probe=StaticProbe({"cuda:0": 24 * GB, "cuda:1": 12 * GB})) as mm:
        assert mm.budgets == {"cuda:0": 24 * GB - GiB, "cuda:1": 12 * GB - GiB}


# -- a simulated rig: four GPUs of different sizes, other processes on three of them -------------


GPUS = {  # device → (NVML's name, total bytes)
    "cuda:0": ("NVIDIA H100 80GB HBM3", 80 * GB),
    "cuda:1": ("NVIDIA GeForce RTX 4090", 24 * GB),
    "cuda:2": ("NVIDIA RTX A6000", 48 * GB),
    "cuda:3": ("Tesla T4", 16 * GB),
}
OTHERS = {  # device → pid → bytes held by processes that are not modelmora's
    "cuda:0": {1111: 10 * GB},
    "cuda:2": {2222: 5 * GB, 3333: 3 * GB},
    "cuda:3": {4444: 15_500_000_000},
}
RAM, RAM_OTHERS = 64 * GB, 8 * GB


class Rig(MemoryProbe):
    """NVML-like readings of four GPUs (names, per-process use) and psutil-like RAM: what
    ``runtime`` holds (as this process) plus :data:`OTHERS`."""

    source = "nvml"

    def __init__(self, runtime: FaultyProvider | None = None):
        self.runtime = runtime

    def read(self) -> list[DeviceMemory]:
        held = self.runtime.held() if self.runtime is not None else {}
        out = []
        for device, (name, total) in GPUS.items():
            processes = dict(OTHERS.get(device, {}))
            if held.get(device):
                processes[os.getpid()] = held[device]
            used = sum(processes.values())
            out.append(DeviceMemory(device, total, used, total - used, "nvml", name, processes))
        used = RAM_OTHERS + held.get("cpu", 0)
        out.append(DeviceMemory("cpu", RAM, used, RAM - used, "psutil", "RAM"))
        return out


def rows(hardware: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["device"]: d for d in hardware["devices"]}


@pytest.mark.anyio
async def test_four_gpus_budgets_and_inventory() -> None:
    """Each GPU without a budget gets its total − 1 GiB; a configured one stays as given; the
    inventory says per device what others hold, what modelmora holds and what is left."""
    runtime = FaultyProvider()
    config = {
        "budgets": {"cuda:1": "20GB"},
        "models": {"llm": {"provider": "faulty", "memory": "9GB"}},
        "reaper_interval": 3600,
        "reconcile_interval": 3600,
    }
    async with ModelManager(config, providers={"faulty": runtime}, probe=Rig(runtime)) as mm:
        assert mm.budgets == {
            "cuda:0": 80 * GB - GiB,
            "cuda:1": 20 * GB,
            "cuda:2": 48 * GB - GiB,
            "cuda:3": 16 * GB - GiB,
        }  # RAM stays unbudgeted unless asked
        await mm.load("llm")
        hw = (await mm.hardware()).to_dict()
    assert [d["device"] for d in hw["devices"]] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cpu"]
    assert hw["gpu_observed"] is True and hw["restricted_to"] is None
    d = rows(hw)
    assert d["cuda:0"] | {"processes": None} == {
        "device": "cuda:0",
        "name": "NVIDIA H100 80GB HBM3",
        "source": "nvml",
        "total": 80 * GB,
        "used": 19 * GB,
        "free": 61 * GB,
        "used_by_others": 10 * GB,
        "used_by_modelmora": 9 * GB,
        "reserve": GiB,
        "budget": 80 * GB - GiB,
        "budget_source": "device",
        "available": 80 * GB - GiB - 19 * GB,
        "allowed": True,
        "processes": None,
    }
    assert d["cuda:0"]["processes"] == {"1111": 10 * GB, str(os.getpid()): 9 * GB}
    assert (d["cuda:1"]["budget_source"], d["cuda:1"]["reserve"], d["cuda:1"]["available"]) == (
        "config",
        0,
        20 * GB,
    )
    assert d["cuda:2"]["used_by_others"] == 8 * GB and d["cuda:2"]["available"] == 40 * GB - GiB
    assert d["cuda:3"]["used_by_others"] == 15_500_000_000 and d["cuda:3"]["available"] == 0
    assert d["cpu"]["budget"] is None and d["cpu"]["available"] is None
    assert d["cpu"]["used_by_others"] == RAM_OTHERS and d["cpu"]["source"] == "psutil"
    json.dumps(hw)  # plain JSON all through


@pytest.mark.anyio
async def test_a_configured_reserve_replaces_the_default() -> None:
    config = {"reserve": "2GiB", "budgets": {"cuda:1": "50%"}}
    async with ModelManager(config, probe=Rig()) as mm:
        assert mm.budgets == {
            "cuda:0": 80 * GB - 2 * GiB,
            "cuda:1": 12 * GB - 2 * GiB,  # a configured reserve comes off percentages too
            "cuda:2": 48 * GB - 2 * GiB,
            "cuda:3": 16 * GB - 2 * GiB,
        }
        assert rows((await mm.hardware()).to_dict())["cuda:1"]["budget_source"] == "percent"
    async with ModelManager({"reserve": 0, "budgets": {"cuda:1": "50%"}}, probe=Rig()) as mm:
        assert mm.budgets["cuda:0"] == 80 * GB and mm.budgets["cuda:1"] == 12 * GB


# -- devices: which GPUs modelmora may use -----------------------------------------------------------


@pytest.mark.anyio
async def test_devices_restricts_the_budgets_to_the_gpus_listed() -> None:
    async with ModelManager({"devices": ["cuda:0", "cuda:2"]}, probe=Rig()) as mm:
        assert mm.budgets == {"cuda:0": 80 * GB - GiB, "cuda:2": 48 * GB - GiB}
        hw = (await mm.hardware()).to_dict()
    assert hw["restricted_to"] == ["cuda:0", "cuda:2"]
    d = rows(hw)
    assert [d[g]["allowed"] for g in GPUS] == [True, False, True, False] and d["cpu"]["allowed"]
    assert d["cuda:1"]["budget"] is None and d["cuda:1"]["total"] == 24 * GB  # still listed


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"devices": ["cuda:0", "cuda:2"], "models": {"tts": {"device": "cuda:1", "memory": "2GB"}}},
            "config: devices: model 'tts' uses cuda:1 (its device), which is not among the devices "
            "modelmora may use (cuda:0, cuda:2); give it one of those, or add cuda:1",
        ),
        (
            {"devices": ["cuda:1"], "models": {"llm": {"memory": {"cuda:1": "8GB", "cuda:3": "8GB"}}}},
            "config: devices: model 'llm' uses cuda:3 (its memory)",
        ),
        (
            {"devices": ["cuda:1"], "models": {"llm": {"memory": "8GB"}}},
            "config: devices: model 'llm' uses cuda:0 (its device)",  # the default device counts
        ),
        (
            {"devices": ["cuda:0"], "budgets": {"cuda:3": "10GB"}},
            "config: devices: budgets.cuda:3 names a device modelmora may not use (cuda:0)",
        ),
        (
            {"devices": ["gpu1"]},
            "config: devices: 'gpu1' is not a device name (cpu, cuda:N); did you mean 'cuda:1'?",
        ),
        ({"devices": "cuda:0"}, "config: devices: Input should be a valid list"),
    ],
)
def test_devices_refuses_what_it_excludes_in_one_line(config: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ManagerConfig.from_dict(config)
    message = str(caught.value)
    assert message.startswith(expected) and "\n" not in message, message


def test_devices_allows_ram_and_whats_listed() -> None:
    cfg = ManagerConfig.from_dict(
        {
            "devices": ["cuda:1", "cuda:1"],
            "budgets": {"cpu": "8GB", "cuda:1": "20GB"},
            "models": {"llm": {"memory": {"cuda:1": "8GB", "cpu": "1GB"}, "device": "cuda:1"}},
        }
    )
    assert cfg.devices == ["cuda:1"]
    assert ManagerConfig.from_dict({"devices": []}).devices == []  # no GPU at all


@pytest.mark.anyio
async def test_devices_naming_a_gpu_the_machine_lacks_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match=r"^devices: cuda:7 is not on this machine \(the nvml probe lists "
                       r"cuda:0, cuda:1, cuda:2, cuda:3\)$"):  # fmt: skip
        async with ModelManager({"devices": ["cuda:0", "cuda:7"]}, probe=Rig()):
            pass
    # without NVML the config is taken at its word
    async with ModelManager(
        {"devices": ["cuda:7"], "budgets": {"cuda:7": "8GB"}}, probe=StaticProbe({})
    ) as mm:
        assert mm.budgets == {"cuda:7": 8 * GB}


@pytest.mark.anyio
async def test_an_inline_model_goes_on_the_first_device_allowed() -> None:
    runtime = FaultyProvider()
    config = {"devices": ["cuda:2"], "reaper_interval": 3600, "reconcile_interval": 3600}
    async with ModelManager(config, providers={"faulty": runtime}, probe=Rig(runtime)) as mm:
        assert mm.spec("faulty/some-model").device == "cuda:2"


# -- GET /hardware and `modelmora status --hardware` --------------------------------------------------


@pytest.fixture
def server() -> Iterator[str]:
    mm = ModelManager({"devices": ["cuda:0", "cuda:1", "cuda:2"], "budgets": {"cuda:1": "20GB"}}, probe=Rig())
    started = ThreadedServer(create_app(mm, token="s3cret")).start()
    yield started.url
    started.stop()


def test_hardware_over_http(server: str) -> None:
    auth = {"Authorization": "Bearer s3cret"}
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.get("/hardware").status_code == 401  # an inventory names processes: the token's
        answer = c.get("/hardware", headers=auth)
        assert answer.status_code == 200
        hw = answer.json()
        schema = c.get("/openapi.json", headers=auth).json()
    d = rows(hw)
    assert list(d) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cpu"]
    assert d["cuda:0"]["budget"] == 80 * GB - GiB and d["cuda:1"]["budget"] == 20 * GB
    assert d["cuda:3"]["allowed"] is False and d["cuda:3"]["processes"] == {"4444": 15_500_000_000}
    assert hw["restricted_to"] == ["cuda:0", "cuda:1", "cuda:2"]
    assert "/hardware" in schema["paths"]


def test_status_hardware_remote(server: str) -> None:
    result = CliRunner().invoke(
        cli, ["status", "--hardware", "--url", server, "--json"], env={"MODELMORA_TOKEN": "s3cret"}
    )
    assert result.exit_code == 0, result.output
    assert rows(json.loads(result.stdout))["cuda:2"]["used_by_others"] == 8 * GB


def test_status_hardware_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelmora.memory.SystemProbe", Rig)  # the probe a CLI manager builds
    config = tmp_path / "modelmora.yaml"
    config.write_text("devices: [cuda:0, cuda:3]\nbudgets:\n  cpu: 16GB\n")
    runner = CliRunner()
    as_json = runner.invoke(cli, ["status", "--hardware", "-c", str(config), "--json"])
    assert as_json.exit_code == 0, as_json.output
    d = rows(json.loads(as_json.stdout))
    assert d["cuda:3"]["budget"] == 16 * GB - GiB and d["cuda:3"]["available"] == 0
    assert d["cpu"]["budget"] == 16 * GB and d["cpu"]["budget_source"] == "config"
    table = runner.invoke(cli, ["status", "--hardware", "-c", str(config)], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    lines = {line.split()[1]: line for line in table.stdout.splitlines() if line.strip().startswith("│ cuda")}
    assert "NVIDIA H100 80GB HBM3" in lines["cuda:0"] and "78.9 GB (device)" in lines["cuda:0"]
    assert "10.0 GB (1 process)" in lines["cuda:0"]
    assert "not used (devices)" in lines["cuda:1"] and "8.0 GB (2 processes)" in lines["cuda:2"]
    assert "modelmora may use: cuda:0, cuda:3 (and cpu)" in table.stdout


@pytest.mark.gpu
@pytest.mark.anyio
async def test_real_gpus_through_nvml() -> None:
    """On a machine with an NVIDIA driver: every GPU NVML lists gets total − 1 GiB, and the
    inventory reads names, totals and others' use off the driver."""
    from modelmora.memory import NvmlProbe

    probe = NvmlProbe()
    gpus = probe.read()
    probe.close()
    if not gpus:
        pytest.skip("needs an NVIDIA GPU and driver (NVML lists none here)")
    async with ModelManager({}) as mm:
        assert mm.budgets == {g.device: g.total - GiB for g in gpus}
        hw = (await mm.hardware()).to_dict()
    d = rows(hw)
    assert hw["gpu_observed"] is True
    for g in gpus:
        assert d[g.device]["source"] == "nvml" and d[g.device]["total"] == g.total and d[g.device]["name"]
        assert 0 <= d[g.device]["used_by_others"] <= g.total
