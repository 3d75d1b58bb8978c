"""``modelmora lease`` (issue 25 item 6): take, extend and release an HTTP lease on a
running server from the command line; bad input is one line."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from modelmora.cli.commands import app
from modelmora.server import create_app
from modelmora.testing.threaded import ThreadedServer

runner = CliRunner()


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    config = {
        "budgets": {"cuda:0": "24GB"},
        "models": {"qwen": {"provider": "simulated", "memory": "9GB", "load_time": 0.01}},
    }
    server = ThreadedServer(create_app(config, state_dir=tmp_path / "state")).start()
    try:
        yield server.url
    finally:
        server.stop()


def test_take_extend_and_release_a_lease(url: str) -> None:
    took = runner.invoke(
        app, ["lease", "qwen", "--ttl", "1h", "--reason", "nightly eval", "--holder", "ci", "--url", url]
    )
    assert took.exit_code == 0, took.output
    found = re.match(r"(lease-\w+): qwen held by ci until .* \((\S+) left\)", took.stdout)
    assert found, took.stdout
    lease_id = found.group(1)
    held = httpx.get(f"{url}/leases/{lease_id}").json()
    assert held["reason"] == "nightly eval" and held["granted"] and 3500 < held["left_s"] <= 3600
    assert httpx.get(f"{url}/status").json()["models"][0]["leases"] == 1  # loaded and held

    extended = runner.invoke(app, ["lease", "--extend", lease_id, "--ttl", "2h", "--url", url])
    assert extended.exit_code == 0 and f"extended {lease_id} on qwen until" in extended.stdout, (
        extended.output
    )
    assert httpx.get(f"{url}/leases/{lease_id}").json()["left_s"] > 7000

    released = runner.invoke(app, ["lease", "--release", lease_id, "--url", url])
    assert released.exit_code == 0 and f"released {lease_id} on qwen" in released.stdout, released.output
    assert httpx.get(f"{url}/leases").json() == []
    again = runner.invoke(app, ["lease", "--release", lease_id, "--url", url])
    assert again.exit_code == 1 and "(HTTP 404)" in again.output and "Traceback" not in again.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "give one of NAME"),
        (["qwen", "--release", "lease-x"], "give one of NAME"),
        (["--extend", "lease-x"], "--extend needs --ttl"),
        (["--release", "lease-x", "--ttl", "1h"], "--release takes no --ttl"),
        (["qwen", "--ttl", "soon"], "--ttl"),
    ],
)
def test_bad_input_is_one_line(args: list[str], expected: str, url: str) -> None:
    result = runner.invoke(app, ["lease", *args, "--url", url])
    assert result.exit_code != 0 and expected in result.output, result.output
    assert "Traceback" not in result.output


def test_an_unknown_model_is_one_line(url: str) -> None:
    result = runner.invoke(app, ["lease", "qwn", "--url", url])
    assert result.exit_code == 1 and "qwn" in result.output and "Traceback" not in result.output, (
        result.output
    )
