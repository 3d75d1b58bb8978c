"""Chains from YAML through the CLI: `modelmora run`, `plan --chain`, and bad chain files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from modelmora import ConfigError
from modelmora.chain import load_chain
from modelmora.cli import app
from modelmora.testing.ollama import OllamaEmulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "chains"
runner = CliRunner()


def seed_chain_for(emu: OllamaEmulator, tmp_path: Path) -> Path:
    data = yaml.safe_load((EXAMPLES / "analysis.yaml").read_text())
    data["management"]["base_url"] = emu.url
    path = tmp_path / "analysis.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_seed_chain_runs_from_the_cli_on_the_emulator(
    make_ollama: Callable[..., OllamaEmulator], tmp_path: Path
) -> None:
    emu = make_ollama(models={"mistral-small:22b": "13GB", "deepseek-r1:32b": "20GB"})
    path = seed_chain_for(emu, tmp_path)
    result = runner.invoke(app, ["run", str(path), "--input", "one GPU, two models", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["loads"] == 3
    assert [s["loaded"] for s in report["steps"]] == [True, True, True]
    assert report["plan"]["steps"][0]["unload_after"] == ["ollama/mistral-small:22b"]
    prompts = [c["messages"][0]["content"] for c in emu.requests("/api/chat")]
    assert [p.split(":")[0] for p in prompts] == ["Quick analysis", "Deep reasoning", "Final summary"]
    assert "one GPU, two models" in prompts[0]
    assert emu.loaded() == [] and emu.stats.evictions == 0


def test_run_prints_steps_loads_and_the_plan(
    make_ollama: Callable[..., OllamaEmulator], tmp_path: Path
) -> None:
    emu = make_ollama(models={"mistral-small:22b": "13GB", "deepseek-r1:32b": "20GB"})
    path = seed_chain_for(emu, tmp_path)
    result = runner.invoke(app, ["run", str(path)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "Residency plan (exact)" in result.output
    assert "[3/3] ollama/mistral-small:22b" in result.output or "[3/3] mistral-small:22b" in result.output
    assert result.output.count("load    ollama/") == 3
    assert "chain completed" in result.output


def test_plan_chain_prints_the_plan_without_loading(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", "--chain", str(EXAMPLES / "llm_sdxl_tts.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)  # stderr may warn that Ollama is unreachable: planning needs no runtime
    assert [s["model"] for s in plan["steps"]] == ["qwen-14b", "sdxl-base", "qwen-14b", "tts"]
    assert plan["loads"] == 4  # the heavy group forbids keeping qwen-14b beside SDXL
    assert plan["steps"][2]["prefetch"] == "tts"  # 11.5 GB + 3.5 GB fit the 15.5 GB budget


def test_bad_chain_files_get_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    cases = {
        "steps: []": "steps",
        "steps:\n  - model: a\n    instrction: x": "instrction",
        "steps:\n  - model: a\n    call: nowhere.py:fn": "no file",
        "steps:\n  - model: a\n    call: json:no_such_fn": "no callable 'no_such_fn'",
        "steps: [": "invalid YAML",
        "management: {auto_unlod: true}\nsteps:\n  - model: a": "auto_unlod",
    }
    for text, expected in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError, match=expected):
            load_chain(bad)
        result = runner.invoke(app, ["run", str(bad), "--input", "x"])
        assert result.exit_code == 1 and expected in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "chain file not found" in result.output


def test_a_chain_without_input_says_how_to_give_one(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("management: {}\nsteps:\n  - model: a\n")
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 1 and "--input" in result.output


def test_file_callables_load_relative_to_the_chain(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("def shout(model, text):\n    return text.upper()\n")
    path = tmp_path / "c.yaml"
    path.write_text("steps:\n  - call: mine.py:shout\n  - call: mine.py:shout\n")
    result = runner.invoke(app, ["run", str(path), "--input", "quiet please", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == "QUIET PLEASE"
