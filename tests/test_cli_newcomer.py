"""What a newcomer hits first: the shipped simulated runtime across commands, a dry-run plan
that stays offline, progress on long commands, readable help and tables in logs, a failed
chain that says why once, and a status page that shows what happened before it opened."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from modelmora.server import create_app
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "modelmora.yaml"


def cli(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point as a user runs it: a fresh process, output not a terminal."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_") and k != "COLUMNS"}
    environ.update({"PYTHONPATH": str(ROOT / "src"), "MODELMORA_HOME": str(home), **(env or {})})
    return subprocess.run(
        [sys.executable, "-c", "from modelmora.cli import main; main()", *args],
        capture_output=True, text=True, timeout=300, env=environ,
    )  # fmt: skip


# -- 19. the simulated runtime across commands ------------------------------------------------


def test_the_simulated_runtime_keeps_its_state_between_commands(tmp_path: Path) -> None:
    loaded = cli("load", "qwen-14b", "-c", str(SHIPPED), home=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded qwen-14b" in loaded.stdout and "simulated" in loaded.stdout + loaded.stderr
    listed = cli("list-loaded", "-c", str(SHIPPED), home=tmp_path)
    assert listed.stdout.split() == ["qwen-14b"], listed.stdout + listed.stderr
    status = json.loads(cli("status", "--json", "-c", str(SHIPPED), home=tmp_path).stdout)
    assert [m["name"] for m in status["models"]] == ["qwen-14b"]
    assert status["devices"]["cuda:0"]["used_by_modelmora"] == 11_500_000_000
    # the exclusive group holds across commands too: loading SDXL evicts qwen-14b
    assert cli("load", "sdxl-base", "-c", str(SHIPPED), home=tmp_path).returncode == 0
    assert cli("list-loaded", "-c", str(SHIPPED), home=tmp_path).stdout.split() == ["sdxl-base"]
    unloaded = cli("unload", "sdxl-base", "-c", str(SHIPPED), home=tmp_path)
    assert unloaded.stdout.strip() == "unloaded sdxl-base", unloaded.stdout + unloaded.stderr
    assert cli("list-loaded", "-c", str(SHIPPED), home=tmp_path).stdout.strip() == ""
    # another config's simulated runtime is another runtime
    other = tmp_path / "other.yaml"
    other.write_text(SHIPPED.read_text())
    assert cli("load", "gpt-sovits", "-c", str(other), home=tmp_path).returncode == 0
    assert cli("list-loaded", "-c", str(SHIPPED), home=tmp_path).stdout.strip() == ""


# -- 20. plan --chain is a dry run --------------------------------------------------------------


def test_plan_chain_does_not_contact_the_runtime(
    make_ollama: Callable[..., OllamaEmulator], tmp_path: Path
) -> None:
    emu = make_ollama(models={"mistral-small:22b": "13GB", "deepseek-r1:32b": "20GB"})
    data = yaml.safe_load((ROOT / "examples" / "chains" / "analysis.yaml").read_text())
    data["management"]["base_url"] = emu.url
    chain = tmp_path / "analysis.yaml"
    chain.write_text(yaml.safe_dump(data))
    planned = cli("plan", "--chain", str(chain), "--json", home=tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert [s["model"] for s in json.loads(planned.stdout)["steps"]] == ["ollama/mistral-small:22b", "ollama/deepseek-r1:32b", "ollama/mistral-small:22b"]  # fmt: skip
    assert emu.stats.requests == 0
    for path in ("/api/ps", "/api/tags", "/api/show", "/api/version", "/api/generate"):
        assert emu.requests(path) == [], path
    # not even a TCP connection (which the emulator would not count): a listener that never
    # accepts finds none queued.  With no attempt there is nothing to retry when the runtime
    # cannot be reached (a bound on the wall-clock time said this, and a slow machine broke it)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        data["management"]["base_url"] = f"http://127.0.0.1:{listener.getsockname()[1]}"
        chain.write_text(yaml.safe_dump(data))
        assert cli("plan", "--chain", str(chain), home=tmp_path).returncode == 0
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    # nothing to reach at all: no warning
    data["management"]["base_url"] = "http://127.0.0.1:9"
    chain.write_text(yaml.safe_dump(data))
    offline = cli("plan", "--chain", str(chain), home=tmp_path)
    assert offline.returncode == 0 and "cannot" not in offline.stderr.lower(), offline.stderr


# -- 21. progress on long commands ----------------------------------------------------------------


def test_long_commands_report_progress_when_output_is_not_a_terminal(tmp_path: Path) -> None:
    config = tmp_path / "mm.yaml"
    config.write_text("models:\n  tiny:\n    memory: 1GB\n    options: {load_time: 0.01}\n")
    bench = cli(
        "bench", "tiny", "-c", str(config), "--cycles", "1", "--strategies", "gc", "--json", home=tmp_path
    )
    assert bench.returncode == 0, bench.stderr
    lines = bench.stderr.strip().splitlines()
    assert len(lines) >= 3 and all("tiny" in line for line in lines), bench.stderr
    assert json.loads(bench.stdout)["lifecycles"]
    load = cli("load", "qwen-14b", "-c", str(SHIPPED), home=tmp_path)
    assert "loading qwen-14b" in load.stderr, load.stderr


# -- 22. help, tables in logs, a failed run, the status page's history ------------------------------


@pytest.mark.parametrize("command", ["plan", "models add", "load", "serve", "bench", "run"])
def test_help_has_no_type_placeholders(command: str, tmp_path: Path) -> None:
    shown = cli(*command.split(), "--help", home=tmp_path, env={"COLUMNS": "120"})
    assert shown.returncode == 0, shown.stderr
    assert not re.search(r"<(bool|str|int|path|list\[str\]|float)>", shown.stdout), shown.stdout
    assert "[[" not in shown.stdout and "]...]..." not in shown.stdout, shown.stdout


def test_tables_are_not_cut_when_output_is_not_a_terminal(tmp_path: Path) -> None:
    config = tmp_path / "mm.yaml"
    long = "a-model-with-a-rather-long-registry-name-that-logs-must-keep-whole"
    config.write_text(f"models:\n  {long}:\n    target: org/{long}-and-its-target\n    memory: 1GB\n    group: some-exclusive-group\n")  # fmt: skip
    listed = cli("models", "-c", str(config), home=tmp_path)
    assert f"org/{long}-and-its-target" in listed.stdout and "…" not in listed.stdout, listed.stdout
    planned = cli("plan", long, long, "-c", str(config), home=tmp_path)
    assert long in planned.stdout and "…" not in planned.stdout, planned.stdout


def test_a_failed_run_says_why_once(make_ollama: Callable[..., OllamaEmulator], tmp_path: Path) -> None:
    emu = make_ollama(models={"qwen2.5:14b": "9GB"})
    chain = tmp_path / "chain.yaml"
    chain.write_text(yaml.safe_dump({
        "management": {"enabled": True, "provider": "ollama", "base_url": emu.url, "budgets": {"cuda:0": "24GB"}},
        "input": "hi",
        "steps": [{"model": "qwen2.5:14b", "instruction": "a {input}"}, {"model": "not-pulled:1b", "instruction": "b {input}"}],
    }))  # fmt: skip
    ran = cli("run", str(chain), home=tmp_path, env={"COLUMNS": "200"})
    assert ran.returncode == 1
    both = ran.stdout + ran.stderr
    assert both.count("'not-pulled:1b' not found") == 1, both
    assert "chain broken at step 2" in ran.stdout
    steps = ran.stdout[ran.stdout.index("\nSteps") :]  # the result table, after the plan's
    row = next(line for line in steps.splitlines() if line.startswith("│ 2 "))
    assert "reuse" not in row and "failed" in row, row
    report = json.loads(cli("run", str(chain), "--json", home=tmp_path).stdout)
    assert report["steps"][1]["load_failed"] is True and "not found" in report["reason"]


def test_the_event_stream_starts_with_recent_history(make_ollama: Callable[..., OllamaEmulator]) -> None:
    emu = make_ollama()
    config = {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}},
        "models": {"qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"}},
    }
    with ThreadedServer(create_app(config)) as server:
        assert httpx.post(f"{server.url}/models/qwen/load", timeout=30).status_code == 200
        seen: list[dict[str, Any]] = []

        def listen() -> None:
            with httpx.stream("GET", f"{server.url}/events", timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen.append(json.loads(line[6:]))
                        if seen[-1]["kind"] == "Loaded":
                            return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        listener.join(timeout=10)
        assert [e["kind"] for e in seen] == ["Loading", "Loaded"], seen
        assert seen[1]["model"] == "qwen" and seen[1].get("history") is True
