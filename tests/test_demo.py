"""The README's main job, end to end: real MiniLM and stand-ins under a CPU budget, and the
same command on the Ollama emulator."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelmora.cli import app
from modelmora.testing.ollama import OllamaEmulator

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.torch
def test_demo_runs_end_to_end_as_a_new_user_would(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the torch extra is not installed (pip install 'modelmora[demo]')")
    env = {**os.environ, "MODELMORA_HOME": str(tmp_path / "home"), "COLUMNS": "140"}
    plot = tmp_path / "timeline.png"
    proc = subprocess.run(
        [sys.executable, "-m", "modelmora.cli", "demo", "--plot", str(plot)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    # says plainly which models are real and which are stand-ins
    assert "all-MiniLM-L6-v2 (real, pretrained): measured" in out
    assert "tiny-gpt2-writer (stand-in, random weights): measured" in out
    # the budget forces swaps, and the plan beats the seeds' rule
    assert "4 loads where the keep-only-if-the-next-step-reuses rule needs 5" in out
    assert out.count("unload  tiny-gpt2-writer") == 2
    assert "left loaded: nothing" in out
    assert plot.read_bytes().startswith(PNG) and not list(tmp_path.glob("*.tmp"))
    # the stand-in was made on first run under MODELMORA_HOME
    assert (tmp_path / "home" / "demo-gpt2-6x384" / "config.json").exists()


def test_demo_on_ollama_swaps_under_a_budget(
    make_ollama: Callable[..., OllamaEmulator], tmp_path: Path
) -> None:
    emu = make_ollama()  # qwen2.5:14b 9 GB, nomic-embed-text 300 MB
    plot = tmp_path / "ollama.png"
    args = ["demo", "--ollama", emu.url, "--llm", "qwen2.5:14b", "--embed", "nomic-embed-text",
            "--budget", "9.8GB", "--plot", str(plot)]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "chain completed" in result.output
    assert result.output.count("load    ollama/nomic-embed-text") == 2  # 9.5 + 0.8 GB (weights + 4096-token KV cache) do not fit 9.8 GB
    assert len(emu.requests("/api/embed")) >= 3 and len(emu.requests("/api/chat")) == 2
    assert emu.loaded() == [] and plot.read_bytes().startswith(PNG)


def test_demo_rejects_a_bad_budget_in_one_line() -> None:
    result = CliRunner().invoke(app, ["demo", "--budget", "lots"])
    assert result.exit_code != 0 and "--budget" in result.output and "Traceback" not in result.output
