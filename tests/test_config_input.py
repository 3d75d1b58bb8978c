"""Config files, environment and command-line input: every mistake is one clear line that
names where it is (file, field, environment variable, flag), and nothing is written or
started on the way to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelmora import ConfigError, ManagerConfig

ROOT = Path(__file__).resolve().parents[1]


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ManagerConfig:
    path = tmp_path / "mm.yaml"
    path.write_text(text)
    return ManagerConfig.from_yaml(path, environ=environ)


def refused(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, environ)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The real entry point in a child process, as a user runs it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    environ.update({"PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200", **(env or {})})
    return subprocess.run(
        [sys.executable, "-c", "from modelmora.cli import main; main()", *args],
        capture_output=True, text=True, timeout=120, env=environ, cwd=cwd,
    )  # fmt: skip


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and proc.returncode != 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- 12. budgets written as mappings are range-checked like strings --------------------------


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ("{percent: 500}", "a percentage budget must be in (0, 100]"),
        ("{percent: -20}", "a percentage budget must be in (0, 100]"),
        ("{percent: 0}", "a percentage budget must be in (0, 100]"),
        ("{percent: .nan}", "a percentage budget must be in (0, 100]"),
        ("{percent: true}", "percent"),
        ("{bytes: -5}", "a size must be a finite, non-negative amount"),
        ("{bytes: 1" + "0" * 400 + "}", "a size must be below"),
        ("1" + "0" * 400, "a size must be below"),
        ("{}", "give bytes or percent"),
        ("{bytes: 5GB, percent: 50}", "give bytes or percent, not both"),
    ],
)
def test_budget_mappings_are_range_checked(tmp_path: Path, budget: str, expected: str) -> None:
    message = refused(tmp_path, f"budgets:\n  cuda:0: {budget}\n")
    assert message.startswith(f"{tmp_path / 'mm.yaml'}: budgets.cuda:0") and expected in message, message


def test_budget_mappings_that_are_fine(tmp_path: Path) -> None:
    cfg = load(tmp_path, "budgets:\n  cuda:0: {percent: 90}\n  cpu: {bytes: 8GB}\n")
    assert (
        cfg.budgets["cuda:0"].resolve(10**10) == 9 * 10**9 and cfg.budgets["cpu"].resolve(None) == 8 * 10**9
    )


@pytest.mark.parametrize(
    "text",
    [
        "models:\n  a:\n    memory: 1" + "0" * 400 + "\n",
        "reserve: 1" + "0" * 400 + "\n",
        "idle_ttl: 1" + "0" * 400 + "\n",
        "models:\n  a:\n    load_time: 1" + "0" * 400 + "\n",
    ],
)
def test_huge_numbers_are_one_line(tmp_path: Path, text: str) -> None:
    refused(tmp_path, text)


# -- 13. intervals are positive ---------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["reaper_interval", "reconcile_interval", "failure_cooldown", "failure_cooldown_max"]
)
@pytest.mark.parametrize("value", ["-1", "-5s", "0", ".inf"])
def test_intervals_must_be_positive_and_finite(tmp_path: Path, field: str, value: str) -> None:
    message = refused(tmp_path, f"{field}: {value}\n")
    assert f"{field}:" in message and "positive" in message, message


@pytest.mark.parametrize(
    ("provider", "setting"),
    [
        ("ollama", "poll_interval"),
        ("ollama", "retry_initial"),
        ("ollama", "retry_max"),
        ("process", "poll_interval"),
        ("vllm", "poll_interval"),
    ],
)
def test_provider_periods_must_be_positive(provider: str, setting: str) -> None:
    from modelmora.providers import create_provider

    with pytest.raises(ConfigError, match=f"providers.{provider}: {setting}: expected a positive"):
        create_provider(provider, **{setting: -1})


# -- 14. duplicate keys and non-mapping files -------------------------------------------------


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, "models:\n  a:\n    memory: 1GB\n  b: {}\n  a:\n    memory: 2GB\n")
    assert "duplicate key 'a'" in message and "line 5" in message, message
    message = refused(tmp_path, "idle_ttl: 5m\nidle_ttl: 10m\n")
    assert "duplicate key 'idle_ttl'" in message


@pytest.mark.parametrize("text", ["[]\n", "0\n", "false\n", "just a string\n", "- a\n"])
def test_a_top_level_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    assert "expected a mapping at the top level" in refused(tmp_path, text)


def test_an_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    assert load(tmp_path, "").models == {} and load(tmp_path, "# only a comment\n").models == {}


# -- 15. command-line input --------------------------------------------------------------------


def test_adding_a_model_for_an_unknown_provider_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "mm.yaml"
    path.write_text("models:\n  a: {}\n")
    line = one_line(cli("models", "add", "x", "-p", "nosuchprovider", "-c", str(path)))
    assert "nosuchprovider" in line and "available:" in line and "simulated" in line
    assert path.read_text() == "models:\n  a: {}\n"
    configured = cli("models", "add", "x", "-p", "mine", "-c", str(path), env={})
    assert configured.returncode == 1  # not a type, not configured under providers:
    path.write_text("providers:\n  mine: {type: simulated}\nmodels:\n  a: {}\n")
    assert cli("models", "add", "x", "-p", "mine", "-c", str(path)).returncode == 0


def test_serve_refuses_bad_input_before_it_says_serving(tmp_path: Path) -> None:
    path = tmp_path / "mm.yaml"
    path.write_text("models:\n  x: {provider: nosuchprovider}\n")
    line = one_line(cli("serve", "-c", str(path), "--port", "18799"))
    assert "models.x.provider" in line and "nosuchprovider" in line
    for port in ("99999", "-1", "0"):
        line = one_line(cli("serve", "--port", port, "-c", str(ROOT / "configs" / "modelmora.yaml")))
        assert "--port" in line, line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["load", "qwen-14b", "--keep-alive", "xyz"], "--keep-alive"),
        (["load"], "NAME"),
        (["status", "--bogus"], "--bogus"),
        (["plan", "qwen-14b", "--chain"], "--chain"),
        (["bench", "--cycles", "0"], "--cycles"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], expected: str) -> None:
    line = one_line(cli(args[0], "-c", str(ROOT / "configs" / "modelmora.yaml"), *args[1:]))
    assert line.startswith("error: ") and expected in line and f"modelmora {args[0]} --help" in line, line


# -- 16. environment variables that are not config fields, and defaults from the environment --


def test_documented_environment_variables_are_not_config_fields(tmp_path: Path) -> None:
    environ = {
        "MODELMORA_HOME": str(tmp_path),
        "MODELMORA_URL": "http://x",
        "MODELMORA_TOKEN": "t",
        "MODELMORA_CONFIG": "x",
    }
    assert load(tmp_path, "models:\n  a: {}\n", environ).models["a"].provider == "simulated"


def test_a_bad_environment_variable_is_blamed_not_the_file(tmp_path: Path) -> None:
    message = refused(tmp_path, "models:\n  a: {}\n", {"MODELMORA_IDLE_TLL": "5m"})
    assert message.startswith("environment MODELMORA_IDLE_TLL:"), message
    message = refused(tmp_path, "models:\n  a: {}\n", {"MODELMORA_DEFAULT_MODEL": "b"})
    assert message.startswith("environment MODELMORA_DEFAULT_MODEL:") and "'b'" in message, message
    message = refused(tmp_path, "models:\n  a: {}\n", {"MODELMORA_MODELS__A__MEMORY": "lots"})
    assert message.startswith("environment MODELMORA_MODELS__A__MEMORY:"), message
    # a mistake in the file is still the file's
    message = refused(tmp_path, "idle_ttl: soon\n", {"MODELMORA_REAPER_INTERVAL": "2s"})
    assert message.startswith(str(tmp_path / "mm.yaml")), message


def test_removing_the_model_the_environment_makes_default_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mm.yaml"
    text = "models:\n  a: {}\n  b: {}\n"
    path.write_text(text)
    env = {"MODELMORA_DEFAULT_MODEL": "b"}
    line = one_line(cli("models", "remove", "b", "-c", str(path), env=env))
    assert "MODELMORA_DEFAULT_MODEL" in line, line
    assert path.read_text() == text
    assert cli("models", "remove", "a", "-c", str(path), env=env).returncode == 0
    assert cli("list-loaded", "-c", str(path), env={"MODELMORA_HOME": str(tmp_path)}).returncode == 0


def test_no_arguments_prints_the_help_and_no_error_line() -> None:
    shown = cli()
    assert "Usage: modelmora" in shown.stdout and shown.stderr == "", shown.stderr
