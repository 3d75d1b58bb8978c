"""The device placement chose reaches the runtimes that run as servers (issue 23, item 3):
a process server sees only that GPU (``CUDA_VISIBLE_DEVICES``) and can name it in its
command (``${DEVICE}``, ``${GPU}``); a vLLM container asks Docker for that GPU alone.

The specs are what admission hands the provider after placement: the registry's
``device: auto`` rewritten to the chosen device, with the devices it could choose from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelmora.providers.process import ProcessProvider, ProcessSettings
from modelmora.providers.vllm import VLLMProvider
from modelmora.spec import ModelSpec


def placed(provider: str, device: str, **options: object) -> ModelSpec:
    return ModelSpec(
        name="m", provider=provider, target="m", device=device, devices=["cuda:0", "cuda:1"],
        memory={device: 10**9}, options=dict(options),
    )  # fmt: skip


@pytest.mark.anyio
async def test_a_placed_process_server_sees_only_its_gpu_and_can_name_it(tmp_path: Path) -> None:
    command = ["server", "--device", "${DEVICE}", "--gpu", "${GPU}", "--port", "${PORT}"]
    async with ProcessProvider("process", ProcessSettings(state_dir=str(tmp_path))) as provider:
        spec = placed("process", "cuda:1", command=command)
        assert provider._command(spec, 8123) == [
            "server",
            "--device",
            "cuda:1",
            "--gpu",
            "1",
            "--port",
            "8123",
        ]
        assert provider._env(spec)["CUDA_VISIBLE_DEVICES"] == "1"
        # the user's own env wins, and a model with a fixed device keeps the machine's view
        own = placed("process", "cuda:1", command=command, env={"CUDA_VISIBLE_DEVICES": "0,1"})
        assert provider._env(own)["CUDA_VISIBLE_DEVICES"] == "0,1"
        fixed = ModelSpec(name="f", provider="process", target="f", device="cuda:1", memory={"cuda:1": 10**9})
        assert provider._env(fixed).get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")


def test_a_placed_vllm_container_asks_for_its_gpu_alone() -> None:
    pytest.importorskip("docker")
    provider = VLLMProvider("vllm")
    request = provider._create_kwargs(placed("vllm", "cuda:1", port=8000))["device_requests"][0]
    assert request["DeviceIDs"] == ["1"] and not request.get("Count"), request
    chosen = provider._create_kwargs(placed("vllm", "cuda:1", port=8000, gpus=["0", "1"]))["device_requests"][
        0
    ]
    assert chosen["DeviceIDs"] == ["0", "1"], chosen  # an explicit choice in options stays


def shared(provider: str, devices: list[str], **options: object) -> ModelSpec:
    """A 2-GPU model as admission hands it over: its shares on the chosen devices."""
    return ModelSpec(
        name="m", provider=provider, target="m", device=devices[0], devices=devices, gpus=len(devices),
        memory=dict.fromkeys(devices, 10**9), options=dict(options),
    )  # fmt: skip


@pytest.mark.anyio
async def test_a_multi_gpu_process_server_sees_all_its_gpus(tmp_path: Path) -> None:
    command = ["server", "--gpus", "${GPU}", "--port", "${PORT}"]
    async with ProcessProvider("process", ProcessSettings(state_dir=str(tmp_path))) as provider:
        spec = shared("process", ["cuda:1", "cuda:3"], command=command)
        assert provider._env(spec)["CUDA_VISIBLE_DEVICES"] == "1,3"
        assert provider._command(spec, 8123) == ["server", "--gpus", "1,3", "--port", "8123"]


def test_a_multi_gpu_llama_server_sees_all_its_gpus() -> None:
    from modelmora.providers.llamacpp import LlamaCppProvider, LlamaCppSettings

    provider = LlamaCppProvider("llamacpp", LlamaCppSettings(binary="/bin/true"))
    spec = shared("llamacpp", ["cuda:0", "cuda:2"])
    assert provider._env(spec)["CUDA_VISIBLE_DEVICES"] == "0,2"
    command = provider._command(spec, 8123)
    assert command[command.index("--tensor-split") + 1] == "953,953", command  # its shares, MiB


def test_a_multi_gpu_vllm_container_asks_for_both_gpus_and_splits_the_model() -> None:
    pytest.importorskip("docker")
    provider = VLLMProvider("vllm")
    kwargs = provider._create_kwargs(shared("vllm", ["cuda:2", "cuda:3"], port=8000))
    request = kwargs["device_requests"][0]
    assert request["DeviceIDs"] == ["2", "3"], request
    command = kwargs["command"]
    assert command[command.index("--tensor-parallel-size") + 1] == "2", command


@pytest.mark.anyio
async def test_vllm_tensor_parallel_size_makes_a_placed_model_need_that_many_gpus() -> None:
    from modelmora.providers.vllm import VLLMSettings

    provider = VLLMProvider("vllm", VLLMSettings(gpu_total=80 * 10**9))
    spec = ModelSpec(
        name="m", provider="vllm", target="m", device="auto",
        options={"port": 8000, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5},
    )  # fmt: skip
    prepared = await provider.prepare(spec)
    assert prepared.gpus == 2
    assert prepared.memory == {"auto": 80 * 10**9}  # 40 GB pre-allocated on each of the two
    # a model on a fixed device keeps it: the user gave the container its GPUs (options.gpus)
    fixed = spec.model_copy(update={"device": "cuda:0"})
    assert (await provider.prepare(fixed)).gpus == 1


@pytest.mark.anyio
async def test_a_torch_model_with_device_auto_is_estimated_for_an_accelerator() -> None:
    """Its safetensors estimate must be the accelerator share placement moves to the chosen
    GPU; keyed ``cpu`` it stayed host memory, so a GPU it filled was counted as empty."""
    pytest.importorskip("torch", reason="the torch extra is not installed (pip install 'modelmora[torch]')")
    from modelmora.core.planner import on_device
    from modelmora.providers.torch import TorchProvider
    from modelmora.testing.models import minilm_path

    spec = ModelSpec(
        name="m", provider="torch", target=str(minilm_path()), device="auto",
        options={"kind": "sentence-transformers"},
    )  # fmt: skip
    prepared = await TorchProvider().prepare(spec)
    assert prepared.memory and "cpu" not in prepared.memory, prepared.memory
    assert set(on_device(prepared.memory, "cuda:1")) == {"cuda:1"}
