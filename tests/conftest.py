"""Shared fixtures: the anyio backend, a manager over the simulated provider, emulated
servers, and the session-wide check that no process a test started outlives the run."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from modelmora import ModelManager
from modelmora.memory import StaticProbe
from modelmora.providers.simulated import SimulatedProvider
from modelmora.testing.leaks import describe, leftovers, mark_session, reap
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_run() -> Iterator[None]:
    """Fails the run, naming them, when processes started by the tests are still alive at
    the end (servers re-parented to PID 1 included), then stops them."""
    marker = mark_session()
    yield
    _stop_multiprocessing_helpers()
    left = leftovers(marker)
    if left:
        report = describe(left)
        reap(left)
        pytest.fail(f"{len(left)} process(es) started by the tests outlived the run:\n{report}", pytrace=False)


def _stop_multiprocessing_helpers() -> None:
    """The stdlib's resource tracker (started with the torch provider's fork server, which
    the provider stops itself) ends only with this process, after the check: stop it now."""
    import sys

    tracker = sys.modules.get("multiprocessing.resource_tracker")
    stop = getattr(getattr(tracker, "_resource_tracker", None), "_stop", None)
    if stop is not None:
        stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


_SESSION_HOME = tempfile.TemporaryDirectory(prefix="modelmora-home-")


def pytest_configure(config: pytest.Config) -> None:
    """A MODELMORA_HOME of the session's own, set before any fixture runs, module-scoped
    servers included: nothing a test writes there (HTTP leases, the simulated runtime's
    state) reaches the user's home or another test's server.  Removed at the end."""
    os.environ["MODELMORA_HOME"] = _SESSION_HOME.name


def pytest_unconfigure(config: pytest.Config) -> None:
    _SESSION_HOME.cleanup()


@pytest.fixture(autouse=True)
def _own_modelmora_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own MODELMORA_HOME: the CLI keeps the simulated runtime's state there."""
    monkeypatch.setenv("MODELMORA_HOME", str(tmp_path_factory.mktemp("modelmora-home")))


@pytest.fixture
def sim() -> SimulatedProvider:
    return SimulatedProvider()


def make_manager(sim: SimulatedProvider, models: dict[str, Any], **config: Any) -> ModelManager:
    """A manager on ``sim`` with a fixed 16 GB cuda:0 budget unless told otherwise."""
    cfg: dict[str, Any] = {"budgets": {"cuda:0": "16GB"}, "reaper_interval": 0.01, **config, "models": models}
    return ModelManager(cfg, providers={"simulated": sim}, probe=StaticProbe({}))


@pytest.fixture
async def heavy_light(sim: SimulatedProvider) -> AsyncIterator[ModelManager]:
    """The seed's RTX 5080 16 GB set: heavy LLM/SDXL models and a light TTS model."""
    models = {
        "qwen-14b": {"memory": "11.5GB", "group": "heavy"},
        "qwen2.5-vl-7b": {"memory": "13.8GB", "group": "heavy"},
        "sdxl-base": {"memory": "10.5GB", "group": "heavy"},
        "gpt-sovits": {"memory": "3.5GB", "group": "light"},
    }
    async with make_manager(sim, models, budgets={"cuda:0": "15.5GB"}) as mm:
        yield mm


@pytest.fixture
def make_ollama(request: pytest.FixtureRequest) -> Iterator[Callable[..., OllamaEmulator]]:
    """Start emulated Ollama servers on loopback; all are stopped after the test.

    A test module that sets ``OLLAMA_STRICT = True`` (the emulator's and the provider's own
    suites) gets the real-like emulator by default; the others keep its simpler model
    (exact names, 2048-token context, no 80 % rule) until the manager compares names by
    ``Provider.target_key`` (issue 19)."""
    started: list[OllamaEmulator] = []
    strict = bool(getattr(request.module, "OLLAMA_STRICT", False))

    def start(**kwargs: Any) -> OllamaEmulator:
        kwargs.setdefault("strict", strict)
        kwargs.setdefault(
            "models",
            {
                "mistral-small:22b": "13GB",
                "qwen2.5:14b": "9GB",
                "nomic-embed-text": {"size": "300MB", "embedding": True},
            },
        )
        emu = OllamaEmulator(**kwargs).start()
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.stop()


@pytest.fixture(scope="session")
def docker_url() -> Iterator[str]:
    """$DOCKER_HOST, or a private dockerd started for this test session (root)."""
    existing = os.environ.get("DOCKER_HOST")
    if existing:
        yield existing
        return
    from modelmora.testing.docker import PrivateDockerd

    why = PrivateDockerd.available()
    if why:
        pytest.skip(why)
    engine = PrivateDockerd().start()
    try:
        yield engine.url
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def image(docker_url: str) -> str:
    """The local image that runs the host's Python (no registry needed)."""
    docker = pytest.importorskip("docker", reason="pip install 'modelmora[docker]'")
    from modelmora.testing.docker import host_image

    client = docker.DockerClient(base_url=docker_url)
    try:
        return host_image(client)
    finally:
        client.close()


@contextlib.contextmanager
def proxy_over(tmp_path: Path, upstream: str, name: str, target: str) -> Iterator[str]:
    """``modelmora serve``'s app on a free port, with one model ``name`` served by the Python
    script ``upstream`` (an OpenAI-style server taking its port as argv[1]) through the
    process provider; yields the app's URL and stops the upstream afterwards."""
    script = tmp_path / "upstream.py"
    script.write_text(upstream)
    from modelmora.server import create_app

    config: dict[str, Any] = {
        "budgets": {"cpu": "4GB"},
        "providers": {"process": {"state_dir": str(tmp_path / "state")}},
        "models": {name: {"provider": "process", "target": target, "device": "cpu", "memory": "60MB",
                          "options": {"command": [sys.executable, str(script), "${PORT}"], "health": "/v1/models"}}},
    }  # fmt: skip
    with ThreadedServer(create_app(config)) as server:
        try:
            yield server.url
        finally:
            # the process provider leaves servers running when the manager closes (by design:
            # a restart adopts them), so the test stops the upstream it started
            unloaded = httpx.post(f"{server.url}/unload-all", json={"force": True}, timeout=30)
            assert unloaded.status_code == 200, unloaded.text


def stream_in_background(url: str, body: dict[str, Any]) -> threading.Thread:
    """POST ``body`` to ``url`` and read the streamed answer to its end, in a thread (a
    request in flight while the test does something else); join the thread to finish."""

    def run() -> None:
        with httpx.stream("POST", url, json=body, timeout=30) as r:
            for _ in r.iter_lines():
                pass

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Until ``condition()`` holds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def servers_for(target: str) -> list[psutil.Process]:
    """Live processes whose command line names ``target`` (a model's servers)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if target in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


@pytest.fixture
def emu(make_ollama: Callable[..., OllamaEmulator]) -> OllamaEmulator:
    """A strict Ollama emulator with its default catalogue, stopped after the test."""
    return make_ollama()
