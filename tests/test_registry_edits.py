"""Registry edits under concurrent use and awkward files: two real processes editing at once
lose nothing, a symlinked config is edited where it points, and a file or directory that
cannot be written is refused in one line with the file untouched."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# each process runs the real CLI command 20 times, in-process to keep the race tight
EDITOR = textwrap.dedent(
    """
    import sys
    from typer.testing import CliRunner
    from modelmora.cli import app

    path, prefix = sys.argv[1], sys.argv[2]
    runner = CliRunner()
    for i in range(20):
        result = runner.invoke(app, ["models", "add", f"{prefix}-{i}", "-p", "simulated", "-m", "1GB", "-c", path])
        assert result.exit_code == 0 and "added" in result.output, result.output
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    return {**env, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from modelmora.cli import main; main()", *args],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_two_processes_editing_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "modelmora.yaml"
    path.write_text("# shared registry\nmodels: {}\n")
    procs = [
        subprocess.Popen([sys.executable, "-c", EDITOR, str(path), prefix], env=_env(), stderr=subprocess.PIPE, text=True)
        for prefix in ("left", "right")
    ]  # fmt: skip
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
    models = yaml.safe_load(path.read_text())["models"]
    assert len(models) == 40 and {f"left-{i}" for i in range(20)} <= set(models)
    assert path.read_text().startswith("# shared registry")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_symlinked_config_is_edited_where_it_points(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "modelmora.yaml"
    real.parent.mkdir()
    real.write_text("models: {}\n")
    link = tmp_path / "modelmora.yaml"
    link.symlink_to(real)
    assert cli("models", "add", "a", "-p", "simulated", "-c", str(link)).returncode == 0
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert "a" in yaml.safe_load(real.read_text())["models"]
    assert cli("models", "remove", "a", "-c", str(link)).returncode == 0
    assert link.is_symlink() and yaml.safe_load(real.read_text())["models"] == {}


def test_a_read_only_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "modelmora.yaml"
    path.write_text("models: {}\n")
    path.chmod(0o444)
    line = one_line(cli("models", "add", "a", "-p", "simulated", "-c", str(path)))
    assert "read-only" in line and str(path) in line
    assert path.read_text() == "models: {}\n" and stat.S_IMODE(path.stat().st_mode) == 0o444


@contextlib.contextmanager
def immutable(directory: Path) -> Iterator[None]:
    """A directory no one may add files to, root included (chattr +i)."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory immutable here (needs root on ext4/xfs/btrfs)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_a_config_in_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "modelmora.yaml"
    path.write_text("models: {}\n")
    with immutable(folder):
        line = one_line(cli("models", "add", "a", "-p", "simulated", "-c", str(path)))
        assert str(folder) in line and ("not permitted" in line or "denied" in line or "read-only" in line), (
            line
        )
        assert path.read_text() == "models: {}\n" and sorted(p.name for p in folder.iterdir()) == [
            "modelmora.yaml"
        ]
