"""Registry edits and cache clearing through the CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelmora import ManagerConfig
from modelmora.cli import app
from modelmora.cli.registry import atomic_write

runner = CliRunner()

CONFIG_TEXT = """\
# my GPU box
budgets:
  cuda:0: 16GB   # leave room for the desktop
default_model: qwen-14b

models:
  # the everyday LLM
  qwen-14b:
    provider: simulated
    memory: 11.5GB
    group: heavy
  tiny:
    provider: torch
    target: org/tiny-model
    memory: 1GB
    options:
      cache_dir: CACHE
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "modelmora.yaml"
    path.write_text(CONFIG_TEXT.replace("CACHE", str(tmp_path / "hf")))
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_add_keeps_comments_and_validates(config: Path) -> None:
    code, output = invoke(
        "models",
        "add",
        "sdxl",
        "--provider",
        "simulated",
        "--memory",
        "10.5GB",
        "--group",
        "heavy",
        "-c",
        str(config),
    )
    assert code == 0, output
    text = config.read_text()
    assert "# my GPU box" in text and "# leave room for the desktop" in text and "# the everyday LLM" in text
    cfg = ManagerConfig.from_yaml(config)
    assert cfg.models["sdxl"].memory == {"cuda:0": 10_500_000_000} and cfg.models["sdxl"].group == "heavy"


def test_bad_add_leaves_the_file_untouched(config: Path) -> None:
    before = config.read_text()
    code, output = invoke(
        "models", "add", "bad", "--provider", "simulated", "--memory", "-1GB", "-c", str(config)
    )
    assert code == 1 and "models.bad.memory.cuda:0: a size must be a finite, non-negative amount" in output
    code, output = invoke("models", "add", "qwen-14b", "--provider", "simulated", "-c", str(config))
    assert code == 1 and "already exists" in output
    code, output = invoke("models", "add", "../evil", "--provider", "simulated", "-c", str(config))
    assert code == 1 and "invalid model name" in output
    assert config.read_text() == before
    # no temp files left (the edit lock's file stays, as flock files do)
    assert [
        p.name for p in config.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")
    ] == []


def test_default_model_is_protected(config: Path) -> None:
    code, output = invoke("models", "remove", "qwen-14b", "-c", str(config))
    assert code == 1 and "is the default model; name a new one with --new-default" in output
    code, output = invoke("models", "remove", "qwen-14b", "--new-default", "tiny", "-c", str(config))
    assert code == 0, output
    cfg = ManagerConfig.from_yaml(config)
    assert cfg.default_model == "tiny" and "qwen-14b" not in cfg.models
    code, output = invoke("models", "set-default", "nope", "-c", str(config))
    assert code == 1 and "unknown model 'nope'" in output


def test_show_and_list_json(config: Path) -> None:
    code, output = invoke("models", "show", "tiny", "-c", str(config), "--json")
    assert code == 0 and json.loads(output)["target"] == "org/tiny-model"
    code, output = invoke("models", "list", "-c", str(config), "--json")
    assert sorted(json.loads(output)) == ["qwen-14b", "tiny"]


def test_atomic_write_keeps_mode_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("old")
    os.chmod(path, 0o600)
    atomic_write(path, "new")
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o600


def make_hf_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str) -> int:
    """Lay out a Hugging Face hub cache entry the way huggingface_hub writes it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return sum(len(c) for c in files.values())


def test_clear_cache_deletes_only_that_model(config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    size = make_hf_repo(
        cache, "org/tiny-model", {"config.json": b"{}" * 100, "model.bin": os.urandom(5000)}, "a" * 40
    )
    make_hf_repo(cache, "org/other", {"model.bin": os.urandom(3000)}, "b" * 40)
    code, output = invoke("clear-cache", "tiny", "--yes", "-c", str(config), "--json")
    assert code == 0, output
    result = json.loads(output)
    assert result["freed_bytes"] == size and result["revisions"] == 1
    assert not (cache / "models--org--tiny-model").exists()
    assert (cache / "models--org--other" / "snapshots" / ("b" * 40) / "model.bin").read_bytes()
    code, output = invoke("clear-cache", "tiny", "--yes", "-c", str(config))
    assert code == 1 and "is not in the Hugging Face cache" in output


def test_clear_cache_asks_first(config: Path, tmp_path: Path) -> None:
    make_hf_repo(tmp_path / "hf", "org/tiny-model", {"model.bin": b"x" * 10}, "c" * 40)
    result = runner.invoke(app, ["clear-cache", "tiny", "-c", str(config)], input="n\n")
    assert result.exit_code == 1 and "nothing deleted" in result.output
    assert (tmp_path / "hf" / "models--org--tiny-model").exists()


def test_clear_cache_for_a_runtime_without_one(config: Path) -> None:
    code, output = invoke("clear-cache", "qwen-14b", "--yes", "-c", str(config))
    assert code == 1 and "keeps no cache modelmora can clear" in output
