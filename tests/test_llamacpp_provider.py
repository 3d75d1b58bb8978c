"""The ``llamacpp`` provider over the REAL C++ ``llama-server`` (built by
``.ci/setup-llama-server.sh``), one server process per model: a completion through the
official ``openai`` client, a crash noticed at once, and adoption after the manager is
killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest
from conftest import servers_for

from modelmora import LoadFailed, ModelManager
from modelmora.estimate import gguf_estimate
from modelmora.memory import StaticProbe
from modelmora.providers import create_provider
from modelmora.providers.llamacpp import LlamaCppProvider, find_llama_server
from modelmora.testing.gguf import make_tiny_gguf

pytestmark = [pytest.mark.anyio, pytest.mark.llama]


@pytest.fixture(scope="session")
def llama_server() -> str:
    """The one way tests find the binary: $MODELMORA_LLAMA_SERVER, PATH, or the build cache."""
    found = find_llama_server()
    if found is None or not os.access(found, os.X_OK):
        pytest.skip(
            "no llama-server binary: run bash .ci/setup-llama-server.sh or set MODELMORA_LLAMA_SERVER"
        )
    return found


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def config(tmp_path: Path, binary: str, target: str, **options: Any) -> dict[str, Any]:
    return {
        "budgets": {"cpu": "4GB"},
        "reconcile_interval": 3600,
        "providers": {
            "llamacpp": {"binary": binary, "state_dir": str(tmp_path / "state"), "stop_grace": "5s"}
        },
        "models": {
            "tiny": {
                "provider": "llamacpp",
                "target": target,
                "device": "cpu",
                "options": {"ctx_size": 256, "parallel": 1, "ready_timeout": "60s", **options},
            }
        },
    }


def complete(endpoint: str, model: str) -> str:
    from openai import OpenAI

    with OpenAI(base_url=f"{endpoint}/v1", api_key="none", timeout=60) as client:
        reply = client.completions.create(model=model, prompt="Hello", max_tokens=4)
    return reply.choices[0].text


async def test_registered_and_estimated_from_the_gguf(gguf_model: Path, tmp_path: Path) -> None:
    size = gguf_model.stat().st_size  # noqa: ASYNC240
    provider = create_provider("llamacpp", binary="/nowhere/llama-server", state_dir=str(tmp_path))
    assert isinstance(provider, LlamaCppProvider)
    spec = ModelManager(config(tmp_path, "/x", str(gguf_model)), probe=StaticProbe({})).spec("tiny")
    prepared = await provider.prepare(spec)
    # the GGUF's estimate (issue 23): its weights, the KV cache of ctx_size 256 and the buffers
    expected = gguf_estimate(gguf_model, ctx=256, parallel=1)
    assert prepared.memory == {"cpu": expected.total} and expected.total > size > expected.weights
    command = provider._command(spec, 1234)
    assert command[:3] == ["/nowhere/llama-server", "-m", str(gguf_model)]
    assert "--ctx-size" in command and "-ngl" in command
    await provider.aclose()


async def test_a_gguf_is_read_once_per_version_not_on_every_load(
    gguf_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every load prepared its spec by parsing the GGUF again (13 ms a swap for a 128 MB file,
    a quarter of modelmora's swap against llama.cpp's router).  The estimate is kept per
    version of the file: read once, again only when the file changes (red: read 3 times)."""
    from modelmora import estimate as estimate_module

    reads: list[str] = []
    real = estimate_module.gguf_estimate

    def counting(source: Any, **kwargs: Any) -> Any:
        reads.append(str(source))
        return real(source, **kwargs)

    monkeypatch.setattr(estimate_module, "gguf_estimate", counting)
    model = tmp_path / "copy.gguf"  # a file no other test has estimated
    model.write_bytes(gguf_model.read_bytes())  # noqa: ASYNC240
    provider = create_provider("llamacpp", binary="/nowhere/llama-server", state_dir=str(tmp_path))
    spec = ModelManager(config(tmp_path, "/x", str(model)), probe=StaticProbe({})).spec("tiny")
    first = await provider.prepare(spec)
    again = await provider.prepare(spec)
    assert first.memory == again.memory and len(reads) == 1
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new version
    await provider.prepare(spec)
    assert len(reads) == 2
    await provider.aclose()


async def test_load_complete_through_openai_and_unload(
    llama_server: str, gguf_model: Path, tmp_path: Path
) -> None:
    async with ModelManager(config(tmp_path, llama_server, str(gguf_model)), probe=StaticProbe({})) as mm:
        async with mm.use("tiny") as handle:
            assert handle.api == "openai" and handle.endpoint is not None
            assert handle.memory["cpu"] > 1_000_000  # the server's RSS, measured
            (server,) = servers_for(str(gguf_model))
            assert server.pid == handle.pid
            text = await anyio.to_thread.run_sync(complete, handle.endpoint, handle.model_name)
            assert isinstance(text, str)
        assert await mm.unload("tiny")
    assert servers_for(str(gguf_model)) == []


async def test_a_missing_gguf_fails_the_load_naming_it(llama_server: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.gguf")
    async with ModelManager(config(tmp_path, llama_server, missing), probe=StaticProbe({})) as mm:
        with pytest.raises(LoadFailed, match="nope.gguf"):
            await mm.load("tiny")


async def test_a_corrupt_gguf_fails_fast_with_the_servers_output(llama_server: str, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 4096)
    async with ModelManager(config(tmp_path, llama_server, str(corrupt)), probe=StaticProbe({})) as mm:
        with pytest.raises(LoadFailed, match=r"could not load '.*corrupt\.gguf'.*exited with code"):
            await mm.load("tiny")
    assert servers_for(str(corrupt)) == []


async def test_kill_9_while_leased_is_noticed_and_the_next_request_reloads(
    llama_server: str, gguf_model: Path, tmp_path: Path
) -> None:
    async with ModelManager(config(tmp_path, llama_server, str(gguf_model)), probe=StaticProbe({})) as mm:
        async with mm.use("tiny") as handle:
            first = handle.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            with anyio.fail_after(30):  # noticed by watch(), not at the next reconcile (an hour)
                while mm.is_loaded("tiny"):
                    await anyio.sleep(0.02)
        async with mm.use("tiny") as again:
            assert again.pid != first
            text = await anyio.to_thread.run_sync(complete, again.endpoint, again.model_name)
            assert isinstance(text, str)
        assert await mm.unload("tiny")
    assert servers_for(str(gguf_model)) == []


CHILD = textwrap.dedent(
    """
    import json, sys, anyio
    from modelmora import ModelManager
    from modelmora.memory import StaticProbe

    async def main():
        mm = ModelManager(json.loads(sys.argv[1]), probe=StaticProbe({}))
        await mm.__aenter__()  # never exited: this process dies with SIGKILL
        handle = await mm.load("tiny", keep_alive=3600)
        print("READY", handle.pid, flush=True)
        await anyio.sleep(3600)

    anyio.run(main)
    """
)


def run_and_kill(cfg: dict[str, Any]) -> int:
    """A manager in its own process loads the model, then dies by SIGKILL; returns the
    server's PID."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg)], stdout=subprocess.PIPE, text=True, env=env
    ) as child:
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line.startswith("READY"), line
            return int(line.split()[1])
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()


async def test_kill_9_of_the_manager_then_a_new_one_adopts_and_unloads(
    llama_server: str, gguf_model: Path, tmp_path: Path
) -> None:
    cfg = config(tmp_path, llama_server, str(gguf_model))
    pid = run_and_kill(cfg)
    assert psutil.pid_exists(pid), "the server outlives its manager"
    started = time.monotonic()
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        async with mm.use("tiny") as adopted:  # waits for the adopted server's readiness
            assert adopted.pid == pid
            text = await anyio.to_thread.run_sync(complete, adopted.endpoint, adopted.model_name)
            assert isinstance(text, str)
        assert await mm.unload("tiny")
    assert time.monotonic() - started < 30
    assert servers_for(str(gguf_model)) == []


# -- router mode ---------------------------------------------------------------------------


def router_config(tmp_path: Path, binary: str, models_dir: Path, **models: str) -> dict[str, Any]:
    return {
        "budgets": {"cpu": "4GB"},
        "reconcile_interval": 3600,
        "providers": {
            "router": {
                "type": "llamacpp_router",
                "binary": binary,
                "models_dir": str(models_dir),
                "state_dir": str(tmp_path / "state"),
                "stop_grace": "5s",
                "args": ["--ctx-size", "256", "--parallel", "1"],
            }
        },
        "models": {
            name: {
                "provider": "router",
                "target": target,
                "device": "cpu",
                "options": {"ready_timeout": "60s"},
            }
            for name, target in models.items()
        },
    }


@pytest.fixture
def models_dir(gguf_model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "tiny.gguf").symlink_to(gguf_model)
    (folder / "corrupt.gguf").write_bytes(b"GGUF" + b"\x00" * 4096)
    return folder


def routers(models_dir: Path) -> list[psutil.Process]:
    """Live routers serving ``models_dir`` (other tests' and benchmarks' routers aside)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = p.info["cmdline"] or []
        if (
            "--models-dir" in cmdline
            and str(models_dir) in cmdline
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(p)
    return found


async def test_router_load_complete_unload_and_nothing_left(
    llama_server: str, models_dir: Path, tmp_path: Path
) -> None:
    cfg = router_config(tmp_path, llama_server, models_dir, tiny=str(models_dir / "tiny.gguf"))
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        async with mm.use("tiny") as handle:
            assert handle.model_name == "tiny" and handle.pid is not None
            assert handle.memory["cpu"] > 1_000_000
            text = await anyio.to_thread.run_sync(complete, handle.endpoint, handle.model_name)
            assert isinstance(text, str)
        assert await mm.unload("tiny")
        assert (
            not psutil.pid_exists(handle.pid) or psutil.Process(handle.pid).status() == psutil.STATUS_ZOMBIE
        )
    assert routers(models_dir) == []


async def test_router_corrupt_gguf_is_a_load_failed_naming_the_file(
    llama_server: str, models_dir: Path, tmp_path: Path
) -> None:
    cfg = router_config(tmp_path, llama_server, models_dir, bad="corrupt")
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        with pytest.raises(LoadFailed, match="corrupt.gguf"):
            await mm.load("bad")
    assert routers(models_dir) == []


async def test_router_child_killed_while_leased_is_noticed_and_reloaded(
    llama_server: str, models_dir: Path, tmp_path: Path
) -> None:
    cfg = router_config(tmp_path, llama_server, models_dir, tiny="tiny")
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        async with mm.use("tiny") as handle:
            first = handle.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            with anyio.fail_after(30):  # noticed by watch(), not at the next reconcile (an hour)
                while mm.is_loaded("tiny"):
                    await anyio.sleep(0.02)
        async with mm.use("tiny") as again:
            assert again.pid not in (None, first)
            text = await anyio.to_thread.run_sync(complete, again.endpoint, again.model_name)
            assert isinstance(text, str)
        assert await mm.unload("tiny")
    assert routers(models_dir) == []


async def test_router_kill_9_of_the_manager_then_a_new_one_adopts(
    llama_server: str, models_dir: Path, tmp_path: Path
) -> None:
    cfg = router_config(tmp_path, llama_server, models_dir, tiny="tiny")
    pid = run_and_kill(cfg)
    assert psutil.pid_exists(pid)
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        async with mm.use("tiny") as adopted:
            assert adopted.pid == pid
            text = await anyio.to_thread.run_sync(complete, adopted.endpoint, adopted.model_name)
            assert isinstance(text, str)
        assert await mm.unload("tiny")
    assert routers(models_dir) == []


async def test_a_router_that_evicts_behind_admissions_back_is_noticed(
    llama_server: str, models_dir: Path, tmp_path: Path
) -> None:
    """A router run with a count limit (``models_max: 1``, as an operator might) unloads the
    older model when admission loads a second one although the budget holds both: the
    table must follow the router at once (the child's exit), not keep a model it lost."""
    (models_dir / "tiny2.gguf").symlink_to(models_dir / "tiny.gguf")
    cfg = router_config(tmp_path, llama_server, models_dir, tiny="tiny", other="tiny2")
    cfg["providers"]["router"]["models_max"] = 1
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        first = await mm.load("tiny")
        await mm.load("other")
        with anyio.fail_after(10):
            while mm.is_loaded("tiny"):
                await anyio.sleep(0.02)
        assert first.pid is not None and not _running(first.pid)
        assert mm.loaded() == ["other"]
        async with mm.use("tiny") as again:  # and it loads again (the router evicts "other")
            assert again.pid not in (None, first.pid)
        with anyio.fail_after(10):
            while mm.is_loaded("other"):
                await anyio.sleep(0.02)
        assert await mm.unload("tiny")
    assert routers(models_dir) == []


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- prompt caches that survive a swap -----------------------------------------------------


async def evaluated(endpoint: str | None, prompt: str) -> int:
    """Prompt tokens the server evaluated for ``prompt`` (its own timings)."""
    async with httpx.AsyncClient(timeout=60) as client:
        reply = await client.post(
            f"{endpoint}/completion", json={"prompt": prompt, "n_predict": 1, "cache_prompt": True}
        )
    reply.raise_for_status()
    return int(reply.json()["timings"]["prompt_n"])


@pytest.mark.parametrize("keep", [True, False])
async def test_a_saved_prompt_cache_is_restored_after_an_unload(
    llama_server: str, gguf_model: Path, tmp_path: Path, keep: bool
) -> None:
    cfg = config(tmp_path, llama_server, str(gguf_model), keep_prompt_cache=keep)
    prefix = "the a " * 25
    async with ModelManager(cfg, probe=StaticProbe({})) as mm:
        async with mm.use("tiny") as handle:
            first = await evaluated(handle.endpoint, prefix + "one")
        assert await mm.unload("tiny")
        async with mm.use("tiny") as handle:
            again = await evaluated(handle.endpoint, prefix + "two")
        assert await mm.unload("tiny")
    saved = list((tmp_path / "state" / "prompt-cache").glob("*.bin"))
    assert first > 100
    if keep:
        assert len(saved) == 1
        assert again < first / 4, (first, again)  # only the new suffix was evaluated
    else:
        assert saved == []
        assert again >= first - 5, (first, again)
    assert servers_for(str(gguf_model)) == []
