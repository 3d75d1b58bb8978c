"""Where each model runs and why, on every surface (issue 23, item 3): ``GET /status`` and
``GET /models``, ``modelmora status`` and the status page show the device(s) the planner
chose for ``device: auto`` / ``gpus: 2`` models and its reason."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from modelmora.cli import app
from modelmora.server import create_app
from modelmora.testing.threaded import ThreadedServer

CONFIG: dict[str, Any] = {
    "budgets": {"cuda:0": "24GB", "cuda:1": "24GB"},
    "models": {
        "one": {"provider": "simulated", "memory": "12GB", "device": "auto"},  # a tie: cuda:0 first
        "tp": {"provider": "simulated", "memory": "20GB", "gpus": 2},  # 10 GB on each
        "fixed": {"provider": "simulated", "memory": "1GB", "device": "cuda:1"},
    },
}


def load_all(url: str) -> None:
    for name in ("one", "tp", "fixed"):
        httpx.post(f"{url}/models/{name}/load", timeout=30).raise_for_status()


def test_status_and_models_say_where_each_model_runs_and_why() -> None:
    with ThreadedServer(create_app(CONFIG)) as server:
        load_all(server.url)
        rows = {m["name"]: m for m in httpx.get(f"{server.url}/status", timeout=10).json()["models"]}
        assert rows["one"]["devices"] == ["cuda:0"], rows["one"]
        assert "best fit" in rows["one"]["placement"]
        assert rows["tp"]["devices"] == ["cuda:0", "cuda:1"], rows["tp"]
        assert "cuda:0 + cuda:1" in rows["tp"]["placement"]
        assert rows["fixed"]["devices"] == ["cuda:1"] and rows["fixed"]["placement"] == ""
        listed = {m["name"]: m for m in httpx.get(f"{server.url}/models", timeout=10).json()}
        assert listed["tp"]["device"] == "auto" and listed["tp"]["gpus"] == 2
        assert (
            listed["tp"]["devices"] == ["cuda:0", "cuda:1"]
            and "without evicting" in listed["tp"]["placement"]
        )

        result = CliRunner().invoke(app, ["status", "--url", server.url], env={"COLUMNS": "220"})
        assert result.exit_code == 0, result.output
        assert "cuda:0 + cuda:1" in result.output, result.output
        assert "tp: fits on cuda:0 + cuda:1 without evicting" in result.output, result.output


def test_status_page_shows_the_device_and_why(tmp_path: Path) -> None:
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (in the dev extra)"
    )
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("no chromium: bash .ci/setup-browser.sh installs Debian's")
    with ThreadedServer(create_app(CONFIG)) as server, playwright.sync_playwright() as p:
        load_all(server.url)
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(server.url)
        page.wait_for_selector("tr[data-model=tp]", timeout=10_000)
        assert "device" in page.inner_text("#models thead")
        row = page.inner_text("tr[data-model=tp]")
        assert "cuda:0 + cuda:1" in row and "best fit" in row, row
        assert "cuda:1" in page.inner_text("tr[data-model=fixed]")
        browser.close()
