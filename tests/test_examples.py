import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "user 1 got qwen-14b" in result.stdout
    assert "evicting qwen-14b to make room for sdxl-base" in result.stdout
    assert "resident now: ['gpt-sovits', 'sdxl-base']" in result.stdout
