"""`modelmora status` tells the truth (issue 26, item 3): the runtime's own expiry where it
has one, an expiry nothing enforces said as such, and the problems in the human output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

import modelmora.cli.commands as commands
from modelmora.cli import app
from modelmora.server import create_app
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "modelmora.yaml")
runner = CliRunner()
WIDE = {"COLUMNS": "200"}


def ollama_config(tmp_path: Path, url: str) -> str:
    path = tmp_path / "ollama.yaml"
    path.write_text(yaml.safe_dump({"providers": {"ollama": {"base_url": url}}}))
    return str(path)


def test_an_adopted_ollama_model_shows_ollamas_own_expiry(
    make_ollama: Callable[..., OllamaEmulator], tmp_path: Path
) -> None:
    emu = make_ollama()
    # loaded behind modelmora's back, for a minute
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": "1m"}, timeout=30)
    config = ollama_config(tmp_path, emu.url)
    result = runner.invoke(app, ["status", "-c", config, "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)["models"]
    assert row["owned"] is False
    assert row["expires_by"] == "runtime"
    assert row["expires_in_s"] is not None and 0 < row["expires_in_s"] <= 60
    table = runner.invoke(app, ["status", "-c", config], env=WIDE)
    assert table.exit_code == 0, table.output
    assert "never" not in table.stdout and "by ollama" in table.stdout, table.stdout


def test_direct_mode_says_an_idle_expiry_needs_a_running_manager() -> None:
    load = runner.invoke(app, ["load", "gpt-sovits", "-c", CONFIG, "--keep-alive", "10m"])
    assert load.exit_code == 0, load.output
    try:
        table = runner.invoke(app, ["status", "-c", CONFIG], env=WIDE)
        assert table.exit_code == 0, table.output
        assert "gpt-sovits" in table.stdout
        assert "only while a manager runs" in table.stdout, table.stdout
    finally:
        runner.invoke(app, ["unload-all", "-c", CONFIG])


def test_an_outage_shows_its_problems_in_the_human_output(tmp_path: Path) -> None:
    config = ollama_config(tmp_path, "http://127.0.0.1:9")  # nothing listens there
    data = json.loads(runner.invoke(app, ["status", "-c", config, "--json"]).stdout)
    assert "observe:ollama" in data["problems"]
    table = runner.invoke(app, ["status", "-c", config], env=WIDE)
    assert table.exit_code == 0, table.output
    assert "observe:ollama" in table.stdout, table.stdout
    assert "No models resident." not in table.stdout
    assert "could not be asked" in table.stdout


def test_status_uses_a_running_local_server_and_says_so(
    make_ollama: Callable[..., OllamaEmulator], monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = make_ollama()
    config = {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}},
        "models": {"qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"}},
    }
    monkeypatch.delenv("MODELMORA_URL", raising=False)
    monkeypatch.delenv("MODELMORA_CONFIG", raising=False)
    with ThreadedServer(create_app(config)) as server:
        assert httpx.post(f"{server.url}/models/qwen/load", timeout=30).status_code == 200
        # where `modelmora serve` listens by default, here the test's own server
        monkeypatch.setattr(commands, "LOCAL_SERVER", server.url, raising=False)
        table = runner.invoke(app, ["status"], env=WIDE)
        assert table.exit_code == 0, table.output
        assert f"(via {server.url})" in table.stdout, table.stdout
        assert "qwen" in table.stdout and "only while a manager runs" not in table.stdout
        data = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
        assert [m["name"] for m in data["models"]] == ["qwen"]


def test_a_held_model_says_it_is_held_not_that_it_expires() -> None:
    """A model a lease holds (an HTTP lease of hours, say) runs no idle countdown: its row
    says so (red: 'expires in 5m' while a lease held it for hours)."""
    row = {"provider": "simulated", "expires_by": "manager", "expires_in_s": 300.0, "leases": 1, "waiting": 0}
    assert commands.expiry(row, direct=False).startswith("held"), commands.expiry(row, direct=False)
    assert commands.expiry({**row, "leases": 0}, direct=False) == "5m"
