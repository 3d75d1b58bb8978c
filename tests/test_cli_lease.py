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
from modelmora.cli.loadbar import eta_text
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
        (["qwen", "--ttl", "-1"], "--ttl"),  # -1 ("never") was a ValueError traceback from json
        (["--extend", "lease-x", "--ttl", "-1"], "--ttl"),
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


def test_eta_text_from_the_measured_load_time() -> None:
    assert eta_text(4.0, 10.0) == "40 % (about 6 s left)"
    assert eta_text(12.0, 10.0) == "99 % (took longer than the 10s measured)"
    assert eta_text(3.2, None) == "3 s so far, no load time measured yet"


def test_load_says_what_it_expects_in_direct_mode_and_through_a_server(url: str, tmp_path: Path) -> None:
    """Off a terminal (here) the bar is one line with the expected load time; on one it is
    a rich bar fed with :func:`eta_text` (the server's side through ``GET /models/NAME``)."""
    config = tmp_path / "m.yaml"
    config.write_text(
        "budgets: {cuda:0: 24GB}\nmodels: {qwen: {provider: simulated, memory: 9GB, load_time: 0.2}}\n"
    )
    direct = runner.invoke(app, ["load", "qwen", "-c", str(config), "--keep-alive", "1m"])
    assert direct.exit_code == 0, direct.output
    assert "loading qwen (expected to take about 200ms) …" in direct.stderr, direct.stderr
    assert "loaded qwen" in direct.stdout
    served = runner.invoke(app, ["load", "qwen", "--url", url])
    assert served.exit_code == 0, served.output
    assert f"loading qwen on {url} (expected to take about 10ms) …" in served.stderr, served.stderr
    assert "loaded qwen" in served.stdout
    missing = runner.invoke(app, ["load", "qwn", "--url", url])
    assert missing.exit_code == 1 and "qwn" in missing.output and "Traceback" not in missing.output
