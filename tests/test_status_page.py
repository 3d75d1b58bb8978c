"""The live status page in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelmora.server import create_app
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def page_setup(make_ollama: Callable[..., OllamaEmulator]) -> tuple[Any, dict[str, Any]]:
    """playwright's sync API and a config with one model on a fresh emulator; skips where
    playwright or chromium is missing."""
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (in the dev extra)"
    )
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium: bash .ci/setup-browser.sh installs Debian's")
    emu = make_ollama()
    config = {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}},
        "models": {"qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"}},
    }
    return playwright, config


def test_status_page_shows_models_memory_and_events(
    make_ollama: Callable[..., OllamaEmulator], tmp_path: Path
) -> None:
    playwright, config = page_setup(make_ollama)
    server = ThreadedServer(create_app(config, token="pagetoken", title="test box"))
    with server, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        page.goto(f"{server.url}/?token=pagetoken")
        page.wait_for_selector("tr[data-model=qwen] .state:text-is('available')")
        httpx.post(
            f"{server.url}/models/qwen/load", headers={"Authorization": "Bearer pagetoken"}, timeout=30
        )
        page.wait_for_selector("tr[data-model=qwen] .state:text-is('ready')", timeout=10_000)
        page.wait_for_selector("#events li:has-text('loaded qwen')", timeout=10_000)
        row = page.inner_text("tr[data-model=qwen]")
        assert "ollama" in row and "cuda:0 9.3 GB" in row and "ready" in row.lower()
        assert "24.0 GB" in page.inner_text("#devices")
        shot = Path(os.environ.get("MODELMORA_SCREENSHOT", tmp_path / "status.png"))
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size[0] == 1000 and image.size[1] >= 600
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, "the screenshot is blank"
    # the chart drew cuda:0 (the second device, #d0774a); that colour appears nowhere else
    assert any(abs(r - 0xD0) < 30 and abs(g - 0x77) < 30 and abs(b - 0x4A) < 30 for _, (r, g, b) in colours)


def test_the_page_shows_events_from_before_it_was_opened(make_ollama: Callable[..., OllamaEmulator]) -> None:
    """Issue 16 item 22: the event stream starts with the recent history."""
    playwright, config = page_setup(make_ollama)
    with ThreadedServer(create_app(config)) as server, playwright.sync_playwright() as p:
        assert httpx.post(f"{server.url}/models/qwen/load", timeout=30).status_code == 200
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_selector("#events li:has-text('loaded qwen')", timeout=10_000)
        browser.close()
