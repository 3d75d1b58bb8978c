"""`python -m modelmora.testing.ollama`: the emulator as a server a person starts by hand
(the README's example sessions on :11499 were made with it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from modelmora.net import free_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "120"}
EMULATOR = [sys.executable, "-m", "modelmora.testing.ollama"]


def test_help_says_how_to_start_it() -> None:
    result = subprocess.run([*EMULATOR, "--help"], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--port", "--models", "--vram", "--load-delay"):
        assert flag in result.stdout


def test_it_serves_the_models_it_was_given_until_stopped() -> None:
    port = free_port()
    args = ["--port", str(port), "--models", "qwen2.5:14b=9GB,nomic-embed-text=300MB",
            "--vram", "24GB", "--load-delay", "0.3s"]  # fmt: skip
    server = subprocess.Popen([*EMULATOR, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.communicate()[0]
            try:
                if httpx.get(f"{url}/api/version").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the emulator never answered"
            time.sleep(0.1)
        tags = {m["name"]: m["size"] for m in httpx.get(f"{url}/api/tags").json()["models"]}
        assert tags == {"qwen2.5:14b": 9_000_000_000, "nomic-embed-text:latest": 300_000_000}
        started = time.monotonic()
        loaded = httpx.post(f"{url}/api/generate", json={"model": "qwen2.5:14b"}, timeout=10).json()
        assert loaded["done_reason"] == "load" and time.monotonic() - started >= 0.3
        assert [m["name"] for m in httpx.get(f"{url}/api/ps").json()["models"]] == ["qwen2.5:14b"]
        # a name with "embed" in it is an embedding model, as nomic-embed-text is in Ollama
        refused = httpx.post(f"{url}/api/generate", json={"model": "nomic-embed-text", "prompt": "x"})
        assert refused.status_code == 400 and "does not support generate" in refused.json()["error"]
    finally:
        server.terminate()
        output = server.communicate(timeout=15)[0].decode()
    assert server.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal it stopped on
    assert "Traceback" not in output
    assert f"http://127.0.0.1:{port}" in output and "qwen2.5:14b" in output


def test_a_bad_model_list_is_one_line_naming_the_option() -> None:
    result = subprocess.run(
        [*EMULATOR, "--models", "qwen2.5:14b=lots"], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert result.returncode == 2
    assert "--models" in result.stderr and "lots" in result.stderr
    assert "Traceback" not in result.stderr
