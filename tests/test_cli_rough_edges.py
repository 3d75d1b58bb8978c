"""Issue 26, the operator's view: the CLI's rough edges, each as an operator met it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from modelmora.cli import app
from modelmora.providers.simulated import SimulatedProvider

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "modelmora.yaml")
runner = CliRunner()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"}
    env.pop("MODELMORA_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "modelmora.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


# -- plan is a dry run: it never loads ---------------------------------------------------


def test_plan_never_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def load(self: SimulatedProvider, spec: Any) -> Any:
        calls.append(spec.name)
        raise AssertionError("plan loaded a model")

    monkeypatch.setattr(SimulatedProvider, "load", load)
    result = invoke("plan", "qwen-14b", "gpt-sovits", "sdxl-base", "qwen-14b", "-c", CONFIG, "--json")
    assert calls == []
    assert result.exit_code == 0, result.output


def test_plan_refuses_a_model_that_can_never_fit_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "mm.yaml"
    cfg.write_text("budgets:\n  cuda:0: 1GB\nmodels:\n  big:\n    memory: 5GB\n")
    result = invoke("plan", "big", "-c", str(cfg))
    assert result.exit_code == 1
    assert "big needs 5.0 GB on cuda:0 but the budget is 1.0 GB" in result.output
    assert "Traceback" not in result.output


# -- load says how long it took and what it evicted --------------------------------------


def test_load_says_the_time_taken_and_what_it_evicted() -> None:
    assert invoke("load", "qwen-14b", "-c", CONFIG).exit_code == 0
    result = invoke("load", "sdxl-base", "-c", CONFIG)
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("loaded sdxl-base"))
    assert " in " in line, line  # "loaded sdxl-base (cuda:0 10.5 GB) in 0.0s"
    assert "evicted qwen-14b" in result.output


# -- keep_alive 0: loaded, and gone at once ----------------------------------------------


def test_loading_a_keep_alive_0_model_warns_that_it_goes_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "mm.yaml"
    cfg.write_text("models:\n  zero:\n    memory: 100MB\n    keep_alive: 0\n")
    result = invoke("load", "zero", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert "keep_alive" in result.output and "at once" in result.output
    # a --keep-alive on the command line is what counts
    kept = invoke("load", "zero", "-c", str(cfg), "--keep-alive", "5m")
    assert "at once" not in kept.output


# -- a failed load: its reason once, an unknown model before "loading …" -----------------


def test_a_failed_load_prints_its_reason_once(tmp_path: Path) -> None:
    cfg = tmp_path / "mm.yaml"
    cfg.write_text("budgets:\n  cuda:0: 1GB\nmodels:\n  big:\n    memory: 5GB\n")
    result = cli("load", "big", "-c", str(cfg))  # the log warning reaches a real stderr only
    assert result.returncode == 1
    assert result.stderr.count("big needs 5.0 GB on cuda:0") == 1, result.stderr


def test_an_unknown_model_is_refused_before_loading_is_said() -> None:
    result = invoke("load", "qwen14b", "-c", CONFIG)
    assert result.exit_code == 1
    assert "unknown model 'qwen14b'" in result.output
    assert "loading" not in result.output, result.output


# -- what Ollama users type --------------------------------------------------------------


def test_ollama_words_ps_list_stop() -> None:
    assert invoke("load", "gpt-sovits", "-c", CONFIG).exit_code == 0
    ps = invoke("ps", "-c", CONFIG)
    assert ps.exit_code == 0, ps.output
    assert "gpt-sovits" in ps.stdout and "Resident models" in ps.stdout  # ollama ps: what is loaded
    listed = invoke("list", "-c", CONFIG)
    assert listed.exit_code == 0, listed.output
    assert "Registered models" in listed.stdout and "sdxl-controlnet" in listed.stdout  # ollama list
    stop = invoke("stop", "gpt-sovits", "-c", CONFIG)
    assert stop.exit_code == 0, stop.output
    assert "unloaded gpt-sovits" in stop.stdout  # ollama stop
    assert invoke("list-loaded", "-c", CONFIG, "--json").stdout.strip() == "[]"


def test_a_mistyped_command_suggests_the_right_one() -> None:
    result = invoke("stauts", "-c", CONFIG)
    assert result.exit_code == 2
    assert "did you mean 'status'" in result.output.lower(), result.output
