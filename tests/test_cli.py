"""The CLI as a user meets it: through typer's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelmora.cli import app

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "modelmora.yaml")
runner = CliRunner()


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"}
    env.pop("MODELMORA_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "modelmora.cli", *args],
        capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=60,
    )  # fmt: skip


def test_models_lists_the_registry() -> None:
    result = runner.invoke(app, ["models", "-c", CONFIG, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["qwen-14b"]["memory"] == {"cuda:0": 11_500_000_000}
    table = runner.invoke(app, ["models", "-c", CONFIG], env={"COLUMNS": "200"})
    assert "sdxl-controlnet" in table.stdout and "default" in table.stdout


def test_plan_one_heavy_model_at_a_time() -> None:
    result = runner.invoke(
        app, ["plan", "qwen-14b", "gpt-sovits", "sdxl-base", "qwen-14b", "-c", CONFIG, "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    steps = data["steps"]
    assert [s["action"] for s in steps] == ["load", "load", "load", "load"]
    assert steps[2]["evicted"] == ["qwen-14b"]
    assert steps[3]["evicted"] == ["sdxl-base"]
    assert sorted(steps[3]["resident"]) == ["gpt-sovits", "qwen-14b"]
    assert data["loads"] == 4
    assert data["peak"]["cuda:0"] == 15_000_000_000 <= data["budgets"]["cuda:0"]


def test_plan_reuses_a_resident_model() -> None:
    result = runner.invoke(app, ["plan", "gpt-sovits", "qwen-14b", "gpt-sovits", "-c", CONFIG, "--json"])
    steps = json.loads(result.stdout)["steps"]
    assert [s["action"] for s in steps] == ["load", "load", "reuse"]


def test_plan_table_output() -> None:
    result = cli("plan", "qwen-14b", "sdxl-base", "qwen-14b", "-c", CONFIG)
    assert result.returncode == 0, result.stderr
    assert "3 loads" in result.stdout and "peak cuda:0 11.5 GB of 15.5 GB" in result.stdout


def test_status_load_unload_in_direct_mode(tmp_path: Path) -> None:
    status = runner.invoke(app, ["status", "-c", CONFIG, "--json"])
    assert status.exit_code == 0, status.output
    data = json.loads(status.stdout)
    assert data["models"] == [] and data["devices"]["cuda:0"]["budget"] == 15_500_000_000
    assert data["gpu_observed"] is False
    load = runner.invoke(app, ["load", "gpt-sovits", "-c", CONFIG, "--keep-alive", "10m"])
    assert load.exit_code == 0 and "loaded gpt-sovits (cuda:0 3.5 GB)" in load.stdout
    # the simulated runtime keeps its state in a file (under MODELMORA_HOME), as a real one would
    assert json.loads(runner.invoke(app, ["list-loaded", "-c", CONFIG, "--json"]).stdout) == ["gpt-sovits"]
    unload = runner.invoke(app, ["unload", "gpt-sovits", "-c", CONFIG])
    assert unload.exit_code == 0 and "unloaded gpt-sovits" in unload.stdout
    assert runner.invoke(app, ["unload-all", "-c", CONFIG]).exit_code == 0
    listed = runner.invoke(app, ["list-loaded", "-c", CONFIG, "--json"])
    assert json.loads(listed.stdout) == []


def test_status_table() -> None:
    result = cli("status", "-c", CONFIG)
    assert result.returncode == 0, result.stderr
    assert "No models resident." in result.stdout
    assert "GPU memory is not observed" in result.stdout


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("models:\n  a:\n    memroy: 3GB\n", "models.a.memroy: unknown field (did you mean 'memory'?)"),
        (
            "models:\n  a:\n    memory: -3GB\n",
            "models.a.memory.cuda:0: a size must be a finite, non-negative amount",
        ),
        ("models:\n  a:\n    provider: olama\n", "models.a.provider: unknown provider type 'olama'"),
        ("models: [\n", "invalid YAML at line"),
    ],
)
def test_bad_config_is_one_line_and_non_zero(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    result = cli("load", "a", "-c", str(path))
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unknown_model_on_the_command_line() -> None:
    for args in (["load", "qwen-41b"], ["plan", "qwen-14b", "sdxl"], ["unload", "qwen"]):
        result = cli(*args, "-c", CONFIG)
        assert result.returncode == 1, args
        assert "unknown model" in result.stderr and "did you mean" in result.stderr
        assert "Traceback" not in result.stderr


def test_typoed_flag_and_bad_duration() -> None:
    result = cli("load", "qwen-14b", "--keepalive", "5m", "-c", CONFIG)
    assert result.returncode == 2 and "No such option" in result.stderr
    result = cli("load", "qwen-14b", "--keep-alive", "soon", "-c", CONFIG)
    assert result.returncode == 2 and "expected a duration" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file() -> None:
    result = cli("status", "-c", "/nonexistent/mm.yaml")
    assert result.returncode == 1 and "config file not found" in result.stderr


def test_too_big_model_refused_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "mm.yaml"
    path.write_text("budgets:\n  cuda:0: 8GB\nmodels:\n  big:\n    memory: 12GB\n")
    result = cli("load", "big", "-c", str(path))
    assert result.returncode == 1
    assert "big needs 12.0 GB on cuda:0 but the budget is 8.0 GB" in result.stderr


def test_help_reads_well() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("status", "list-loaded", "load", "unload", "unload-all", "models", "plan"):
        assert command in result.stdout


def test_version() -> None:
    import modelmora

    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"modelmora {modelmora.__version__}\n"


def without(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment in which importing ``modules`` fails as if they were not installed."""
    shadow = tmp_path / "shadow"
    for module in modules:
        (shadow / module).mkdir(parents=True)
        (shadow / module / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {module!r}", name={module!r})\n'
        )
    return {**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT / 'src'}", "COLUMNS": "80"}


@pytest.mark.parametrize(
    ("args", "missing", "extra"),
    [
        (["demo", "--no-plot"], "torch", "demo"),
        (["demo", "--ollama", "http://127.0.0.1:9"], "litellm", "chain"),
        (["serve", "--port", "1"], "fastapi", "server"),
        (["bench", "--quick"], "torch", "torch"),
    ],
)
def test_a_missing_extra_is_one_line_with_the_install_command(
    tmp_path: Path, args: list[str], missing: str, extra: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "modelmora.cli", *args],
        capture_output=True, text=True, env=without(tmp_path, missing), cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()  # one line, however narrow the terminal
    assert line.startswith("error: ") and f"{missing} is missing" in line
    assert f"[{extra}]'" in line and "pip install" in line  # rich markup must not eat the extra
