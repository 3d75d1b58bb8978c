"""Issue 26, the operator's view: config mistakes that used to be accepted and then meant
something else (a budget for a device no model uses, 12 bytes of memory, NaN as "forever",
a load that always times out at once) are refused in one line that names the file, the
field and what was probably meant; every command reads a file the same way."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_config_input import load, refused  # one YAML file, one line of error

from modelmora import ConfigError, ManagerConfig
from modelmora.spec import format_duration, parse_duration

ROOT = Path(__file__).resolve().parents[1]




def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    environ.update({"PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200", **(env or {})})
    return subprocess.run(
        [sys.executable, "-c", "from modelmora.cli import main; main()", *args],
        capture_output=True, text=True, timeout=120, env=environ,
    )  # fmt: skip


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and proc.returncode != 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- budgets name devices that models use -----------------------------------------------------


@pytest.mark.parametrize(
    ("device", "meant"),
    [("gpu0", "cuda:0"), ("GPU:1", "cuda:1"), ("cuda0", "cuda:0"), ("cuda:O", "cuda:0"), ("ram", "cpu")],
)
def test_a_budget_for_a_device_no_model_uses_is_refused(tmp_path: Path, device: str, meant: str) -> None:
    message = refused(tmp_path, f"budgets:\n  {device}: 16GB\nmodels:\n  a:\n    memory: 8GB\n")
    assert message.startswith(f"{tmp_path / 'mm.yaml'}: budgets"), message
    assert repr(device) in message and f"did you mean {meant!r}?" in message, message


def test_budgets_for_devices_that_exist_or_are_used_are_fine(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "budgets:\n  cuda:0: 16GB\n  cuda:3: 80GB\n  cpu: 50%\n  box-b:cuda:0: 24GB\n  npu0: 8GB\n"
        "providers:\n  remote: {type: ollama, device: 'box-b:cuda:0'}\n"
        "models:\n  a: {memory: 8GB}\n  b: {provider: remote, memory: 4GB}\n"
        "  c: {device: npu0, memory: 2GB}\n",
    )
    assert set(cfg.budgets) == {"cuda:0", "cuda:3", "cpu", "box-b:cuda:0", "npu0"}


def test_a_budget_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    message = refused(tmp_path, "models:\n  a: {memory: 8GB}\n", {"MODELMORA_BUDGETS": "gpu0=16GB"})
    assert message.startswith("environment MODELMORA_BUDGETS: budgets"), message
    assert "did you mean 'cuda:0'?" in message


# -- sizes need a unit --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "hint"),
    [
        ("models:\n  a:\n    memory: 12\n", "models.a.memory", "'12GB'"),
        ("models:\n  a:\n    memory: 11.5\n", "models.a.memory", "'11.5GB'"),
        ('models:\n  a:\n    memory: "12"\n', "models.a.memory", "'12GB'"),
        ("models:\n  a:\n    memory: {cuda:0: 10GB, cpu: 2}\n", "models.a.memory.cpu", "'2GB'"),
        ("models:\n  a:\n    memory: 11500000000\n", "models.a.memory", "'11500000000B'"),
        ("budgets:\n  cuda:0: 16\n", "budgets.cuda:0", "'16GB'"),
        ("budgets:\n  cuda:0: {bytes: 16}\n", "budgets.cuda:0.bytes", "'16GB'"),
        ("reserve: 1\n", "reserve", "'1GB'"),
    ],
)
def test_a_size_without_a_unit_is_refused(tmp_path: Path, text: str, field: str, hint: str) -> None:
    message = refused(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'mm.yaml'}: {field}: "), message
    assert "unit" in message and f"did you mean {hint}?" in message, message


def test_zero_and_sizes_with_units_need_nothing_more(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "reserve: 0\nbudgets:\n  cuda:0: 90%\n  cpu: {bytes: 8GiB}\n"
        "models:\n  a: {memory: 0}\n  b: {memory: 512MiB}\n  c: {memory: {cuda:0: 1GB, cpu: 0}}\n",
    )
    assert cfg.models["a"].memory == {"cuda:0": 0} and cfg.models["c"].memory["cpu"] == 0


def test_a_size_without_a_unit_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    message = refused(tmp_path, "", {"MODELMORA_RESERVE": "512"})
    assert message.startswith("environment MODELMORA_RESERVE: reserve: ") and "'512GB'" in message, message


def test_python_callers_still_give_bytes() -> None:
    # in code a number of bytes is unambiguous (12 * 10**9); a dump reloads losslessly
    cfg = ManagerConfig.from_dict({"budgets": {"cuda:0": 16 * 10**9}, "models": {"a": {"memory": 10**9}}})
    assert ManagerConfig.from_dict(cfg.model_dump(mode="json")) == cfg


def test_registry_edits_refuse_a_size_without_a_unit(tmp_path: Path) -> None:
    path = tmp_path / "mm.yaml"
    path.write_text("models:\n  a: {memory: 1GB}\n")
    line = one_line(cli("models", "add", "b", "-p", "simulated", "--memory", "12", "-c", str(path)))
    assert f"{path}: models.b.memory" in line and "'12GB'" in line, line
    assert path.read_text() == "models:\n  a: {memory: 1GB}\n"


# -- durations: -1 is never, nothing else is --------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "idle_ttl: .nan\n",
        "wait_timeout: .nan\n",
        "models:\n  a:\n    keep_alive: .nan\n",
        "models:\n  a:\n    load_timeout: .nan\n",
        "models:\n  a:\n    load_time: .nan\n",
        "idle_ttl: .inf\n",
        "idle_ttl: -.inf\n",
        "models:\n  a:\n    keep_alive: .inf\n",
        "idle_ttl: nan\n",
        "idle_ttl: inf\n",
        "idle_ttl: -inf\n",
    ],
)
def test_nan_and_infinity_are_not_durations(tmp_path: Path, text: str) -> None:
    message = refused(tmp_path, text)
    assert "-1 means never" in message, message


@pytest.mark.parametrize(
    "text",
    [
        "models:\n  a:\n    keep_alive: -5\n",
        "idle_ttl: -5\n",
        "wait_timeout: -2\n",
        "models:\n  a:\n    keep_alive: -1m\n",
        "models:\n  a:\n    keep_alive: '-0.5'\n",
        "idle_ttl: -1" + "0" * 30 + "\n",
    ],
)
def test_only_minus_one_means_never(tmp_path: Path, text: str) -> None:
    message = refused(tmp_path, text)
    assert "only -1 means never" in message, message


@pytest.mark.parametrize("value", [-1, "-1", -1.0, "-1.0"])
def test_minus_one_is_never(value: object) -> None:
    assert parse_duration(value) == math.inf  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["0", "0s", "-0"])
def test_a_zero_load_timeout_is_refused(tmp_path: Path, value: str) -> None:
    message = refused(tmp_path, f"models:\n  a:\n    load_timeout: {value}\n")
    assert "models.a.load_timeout" in message and "greater than 0" in message, message


def test_nan_over_http_is_not_forever() -> None:
    # what a JSON body's NaN (Python's json reads it) becomes before the duration is parsed
    for raw in (json.loads("NaN"), json.loads("Infinity"), json.loads("-Infinity")):
        with pytest.raises(ValueError, match="-1 means never"):
            parse_duration(raw)


# -- one duration format when printing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (1.5, "1.5s"),
        (45, "45s"),
        (90, "1m30s"),
        (300, "5m"),
        (5400, "1h30m"),
        (7200, "2h"),
        (86400 * 2 + 3600, "49h"),
        (math.inf, "never"),
    ],
)
def test_durations_print_as_they_are_written(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    if not math.isinf(seconds):
        assert parse_duration(text) == pytest.approx(seconds)


# -- every command reads a file the same way ------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["models", "list"], ["models", "show", "a"], ["models"], ["status"], ["load", "a"], ["list-loaded"]],
)
def test_every_command_refuses_an_unknown_provider_type_alike(tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "mm.yaml"
    path.write_text("models:\n  a:\n    provider: olama\n")
    line = one_line(cli(*args, "-c", str(path)))
    assert f"{path}: models.a.provider: unknown provider type 'olama'" in line, line
    assert "did you mean 'ollama'?" in line, line


def test_an_unknown_type_of_a_provider_instance_is_refused_by_models_list(tmp_path: Path) -> None:
    path = tmp_path / "mm.yaml"
    path.write_text("providers:\n  box: {type: vlm}\nmodels:\n  a: {provider: box}\n")
    line = one_line(cli("models", "list", "-c", str(path)))
    assert f"{path}: " in line and "'vlm'" in line and "did you mean 'vllm'?" in line, line


def test_bad_provider_settings_are_refused_by_models_list(tmp_path: Path) -> None:
    path = tmp_path / "mm.yaml"
    path.write_text("providers:\n  ollama: {timeout: soon}\nmodels:\n  a: {provider: ollama}\n")
    line = one_line(cli("models", "list", "-c", str(path)))
    assert f"{path}: providers.ollama: timeout" in line, line


def test_models_show_is_human_readable(tmp_path: Path) -> None:
    path = tmp_path / "mm.yaml"
    path.write_text(
        "idle_ttl: 5m\nmodels:\n  a:\n    memory: {cuda:0: 11.5GB, cpu: 512MB}\n"
        "    keep_alive: -1\n    load_time: 90\n"
    )
    shown = cli("models", "show", "a", "-c", str(path))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "cuda:0 11.5 GB, cpu 512.0 MB" in text, text
    assert "never" in text and "1m30s" in text and "10m" in text, text  # keep_alive, load_time, load_timeout
    assert "11500000000" not in text and "600.0" not in text, text
    data = json.loads(cli("models", "show", "a", "-c", str(path), "--json").stdout)
    assert data["memory"] == {"cuda:0": 11_500_000_000, "cpu": 512_000_000} and data["keep_alive"] == -1


def test_a_chain_files_budget_needs_a_unit_too(tmp_path: Path) -> None:
    from modelmora.chain.files import read_chain_file

    path = tmp_path / "chain.yaml"
    path.write_text("management:\n  budgets:\n    cuda:0: 24\nsteps:\n  - model: m\n    instruction: x\n")
    with pytest.raises(ConfigError) as info:
        read_chain_file(path)
    assert str(info.value).startswith(f"{path}: management: budgets.cuda:0: ") and "'24GB'" in str(info.value)
