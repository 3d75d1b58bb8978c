import pytest

from modelmora import ConfigError, ModelManager
from modelmora.config import Budget
from modelmora.memory import (
    DeviceMemory,
    MemoryMonitor,
    NvmlProbe,
    PsutilProbe,
    StaticProbe,
    SystemProbe,
    resolve_budgets,
)

GB = 10**9


def test_absolute_and_relative_budgets() -> None:
    readings = [
        DeviceMemory("cuda:0", 16 * GB, 1 * GB, 15 * GB, "static"),
        DeviceMemory("cpu", 32 * GB, 0, 32 * GB, "static"),
    ]
    budgets = {"cuda:0": Budget.parse("90%"), "cpu": Budget.parse("8GB")}
    assert resolve_budgets(budgets, GB // 2, readings) == {"cuda:0": int(14.4 * GB) - GB // 2, "cpu": 8 * GB}


def test_measured_gpu_without_budget_gets_total_minus_reserve() -> None:
    readings = [
        DeviceMemory("cuda:0", 24 * GB, 0, 24 * GB, "nvml"),
        DeviceMemory("cpu", 32 * GB, 0, 32 * GB, "psutil"),
    ]
    assert resolve_budgets({}, GB, readings) == {"cuda:0": 23 * GB}  # RAM stays unbudgeted unless asked


def test_relative_budget_on_an_unmeasured_device_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError, match=r"budgets.cuda:0: 90% is relative but cuda:0's memory cannot be measured"
    ):
        resolve_budgets({"cuda:0": Budget.parse("90%")}, 0, [])


def test_psutil_reads_this_machine() -> None:
    [ram] = PsutilProbe().read()
    assert ram.device == "cpu" and ram.total > 0 and 0 <= ram.free <= ram.total


def test_nvml_without_a_gpu_is_silent_not_an_error() -> None:
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA GPU; the gpu-marked test covers it")
    probe = NvmlProbe()
    assert probe.read() == []
    probe.close()
    devices = SystemProbe().read()
    assert [d.device for d in devices] == ["cpu"]


@pytest.mark.gpu
def test_nvml_reads_the_gpu() -> None:
    import shutil

    if not shutil.which("nvidia-smi"):
        pytest.skip("needs an NVIDIA GPU (NVML)")
    devices = NvmlProbe().read()
    assert devices and devices[0].device == "cuda:0"
    assert devices[0].total > devices[0].free >= 0


def test_snapshot_keeps_the_peak() -> None:
    monitor = MemoryMonitor(StaticProbe({}))
    monitor.note_usage({"cuda:0": 10 * GB})
    snap = monitor.snapshot({"cuda:0": 16 * GB}, {"cuda:0": 4 * GB}, [])
    assert snap.devices["cuda:0"].peak == 10 * GB
    assert snap.devices["cuda:0"].modelmora == 4 * GB


@pytest.mark.anyio
async def test_percent_budget_from_a_measured_device() -> None:
    mm = ModelManager({"budgets": {"cuda:0": "50%"}}, probe=StaticProbe({"cuda:0": 24 * GB}))
    async with mm:
        assert mm.budgets == {"cuda:0": 12 * GB}
