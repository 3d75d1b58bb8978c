"""The vLLM-in-Docker provider on a real Docker engine: the llama.cpp server in a container
(a real OpenAI-compatible server), and the vLLM stand-in for the sleep/wake endpoints
that llama.cpp lacks."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

docker = pytest.importorskip("docker", reason="pip install 'modelmora[docker]'")

from modelmora import LoadFailed, ModelManager, ModelNotFound  # noqa: E402
from modelmora import events as ev  # noqa: E402
from modelmora.memory import StaticProbe  # noqa: E402
from modelmora.net import free_port  # noqa: E402
from modelmora.providers.vllm import LABEL  # noqa: E402
from modelmora.testing.docker import host_mounts  # noqa: E402
from modelmora.testing.gguf import make_tiny_gguf  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.docker]
# the modelmora these tests import, also inside the container (a worktree's editable install
# may point elsewhere)
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def client(docker_url: str) -> Iterator[Any]:
    c = docker.DockerClient(base_url=docker_url)
    yield c
    for container in c.containers.list(all=True, filters={"label": f"{LABEL}"}):
        container.remove(force=True)
    c.close()


def managed(client: Any) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"{LABEL}=vllm"})


def cfg(docker_url: str, models: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {
        "budgets": {"cuda:0": "16GB"},
        "providers": {"vllm": {"docker_url": docker_url, "gpus": None, "hf_cache": None, "stop_grace": "5s",
                               "ready_timeout": "60s", "poll_interval": 0.1, **settings}},
        "models": models,
    }  # fmt: skip


def standin(image: str, port: int, **extra: Any) -> dict[str, Any]:
    """The vLLM stand-in run with vLLM's own arguments, built by the provider."""
    return {
        "provider": "vllm", "target": "Qwen/Qwen2.5-14B-Instruct", "memory": "10GB", "warm_tier": True,
        "options": {"image": image, "port": port, "entrypoint": [sys.executable, "-m", "modelmora.testing.vllm"],
                    "volumes": host_mounts(), "env": {"MODELMORA_STANDIN_WAKE_DELAY": "0.05", "PYTHONPATH": SRC}, "max_model_len": 4096},
        **extra,
    }  # fmt: skip


async def test_the_llama_cpp_server_in_a_container(
    docker_url: str, image: str, client: Any, tmp_path: Path
) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("bash .ci/setup.sh builds llama-cpp-python[server]")
    model = make_tiny_gguf(tmp_path / "tiny.gguf")
    port = free_port()
    spec = {
        "provider": "vllm", "target": str(model), "memory": "2GB",
        "options": {"image": image, "port": port, "served_name": str(model), "health": "/v1/models",
                    "entrypoint": [sys.executable, "-m", "llama_cpp.server"],
                    "command": ["--model", "${MODEL}", "--host", "127.0.0.1", "--port", "${PORT}"],
                    "volumes": host_mounts(tmp_path)},
    }  # fmt: skip
    async with ModelManager(cfg(docker_url, {"tiny": spec}), probe=StaticProbe({})) as mm:
        async with mm.use("tiny") as handle:
            (container,) = managed(client)
            assert container.name == "modelmora-vllm-tiny" and container.labels["modelmora.model"] == "tiny"
            async with httpx.AsyncClient(timeout=60) as http:
                reply = await http.post(
                    f"{handle.endpoint}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}
                )
            assert reply.status_code == 200 and "choices" in reply.json()
        assert await mm.unload("tiny")
        assert managed(client) == []  # stopped, removed, name free
        await mm.load("tiny")  # and it loads again under the same name
        assert len(managed(client)) == 1
        await mm.unload("tiny")


async def test_sleep_and_wake_on_the_vllm_stand_in(docker_url: str, image: str, client: Any) -> None:
    port = free_port()
    seen: list[ev.Event] = []
    async with ModelManager(cfg(docker_url, {"qwen": standin(image, port)}), probe=StaticProbe({})) as mm:
        mm.events.subscribe(seen.append)
        await mm.load("qwen")
        (container,) = managed(client)
        assert "--enable-sleep-mode" in container.attrs["Args"]
        assert "VLLM_SERVER_DEV_MODE=1" in container.attrs["Config"]["Env"]
        assert await mm.park("qwen")
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"http://127.0.0.1:{port}/is_sleeping")).json() == {"is_sleeping": True}
            status = {m.name: m for m in (await mm.status()).models}
            # the weights in host RAM; the CUDA context and graphs (1 GiB allowance without NVML) on the GPU
            assert status["qwen"].memory == {"cuda:0": 1024**3, "cpu": 10 * 10**9}
            async with mm.use("qwen") as handle:  # wakes through admission
                reply = await http.post(f"{handle.endpoint}/v1/chat/completions",
                                        json={"model": "qwen", "messages": [{"role": "user", "content": "awake?"}]})  # fmt: skip
                assert (
                    reply.status_code == 200 and "awake?" in reply.json()["choices"][0]["message"]["content"]
                )
            assert (await http.get(f"http://127.0.0.1:{port}/is_sleeping")).json() == {"is_sleeping": False}
        assert [type(e).__name__ for e in seen if isinstance(e, ev.Slept | ev.Woke)] == ["Slept", "Woke"]
        await mm.unload("qwen")
    assert managed(client) == []


async def test_missing_image_and_early_exit_are_clear_and_leave_nothing(
    docker_url: str, image: str, client: Any
) -> None:
    missing = standin("vllm/vllm-openai:v0.0.0-not-here", free_port())
    missing["options"]["image"] = "vllm/vllm-openai:v0.0.0-not-here"
    broken = standin(image, free_port())
    broken["options"]["entrypoint"] = [
        sys.executable,
        "-c",
        "import sys; print('CUDA out of memory'); sys.exit(3)",
    ]
    async with ModelManager(
        cfg(docker_url, {"gone": missing, "broken": broken}), probe=StaticProbe({})
    ) as mm:
        with pytest.raises(
            ModelNotFound, match=r"image 'vllm/vllm-openai:v0.0.0-not-here' is not present; run `docker pull"
        ):
            await mm.load("gone")
        with pytest.raises(
            LoadFailed, match="exited before it was ready; last log lines: CUDA out of memory"
        ):
            await mm.load("broken")
        assert mm.loaded() == []
    assert managed(client) == []


async def test_a_new_manager_adopts_containers_and_leaves_others_alone(
    docker_url: str, image: str, client: Any
) -> None:
    port = free_port()
    config = cfg(docker_url, {"qwen": standin(image, port)})
    async with ModelManager(config, probe=StaticProbe({})) as first:
        await first.load("qwen", keep_alive=float("inf"))
    foreign = client.containers.run(
        image, [sys.executable, "-c", "import time; time.sleep(300)"], detach=True, name="not-ours",
        volumes={p: {"bind": m.split(":")[0], "mode": "ro"} for p, m in host_mounts().items()}, network_mode="host",
    )  # fmt: skip
    try:
        async with ModelManager(config, probe=StaticProbe({})) as second:
            (status,) = (await second.status()).models
            assert status.name == "qwen" and status.state == "ready" and status.owned
            async with second.use("qwen") as handle, httpx.AsyncClient(timeout=10) as http:
                assert (await http.get(f"{handle.endpoint}/v1/models")).json()["data"][0]["id"] == "qwen"
            await second.unload_all()
            assert managed(client) == []
        foreign.reload()
        assert foreign.status == "running"  # no label: never touched
    finally:
        foreign.remove(force=True)


async def test_a_name_taken_by_a_foreign_container_is_refused(
    docker_url: str, image: str, client: Any
) -> None:
    squatter = client.containers.create(image, ["/bin/true"], name="modelmora-vllm-qwen")
    try:
        async with ModelManager(
            cfg(docker_url, {"qwen": standin(image, free_port())}), probe=StaticProbe({})
        ) as mm:
            with pytest.raises(LoadFailed, match="is taken by a container modelmora does not manage"):
                await mm.load("qwen")
        squatter.reload()
        assert squatter.status == "created"
    finally:
        squatter.remove(force=True)
