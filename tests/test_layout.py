"""The package's top level is the library; the command-line applications live in
``modelmora.cli`` (issue 16 item 23), and the console script still finds them."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_APPS = ("demo", "bench", "bench_report", "timeline", "quick", "cache", "registry", "remote")


def test_the_command_line_applications_are_under_cli() -> None:
    top = {p.stem for p in (ROOT / "src" / "modelmora").glob("*.py")}
    assert not top & {*CLI_APPS, "cli"}, sorted(top & {*CLI_APPS, "cli"})
    for name in (*CLI_APPS, "commands"):
        importlib.import_module(f"modelmora.cli.{name}")


def test_the_console_script_and_python_dash_m_still_work() -> None:
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["modelmora"]
    module, _, attr = script.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    shown = subprocess.run([sys.executable, "-m", "modelmora.cli", "--help"], capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert shown.returncode == 0 and "Usage: " in shown.stdout


def test_the_library_does_not_import_the_command_line() -> None:
    code = "import sys, modelmora, modelmora.chain.report, modelmora.server; print('typer' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
