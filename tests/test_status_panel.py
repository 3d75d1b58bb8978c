"""The status page as a control panel (issue 26 item 2), in a real headless Chromium driven
by Playwright, as ``tests/test_status_page.py`` does: every registered model with its state
and actions, the memory per device on its budget, banners for problems, recent requests
kept on the server, and stale data greyed out once the server is gone."""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelmora.core import ModelManager
from modelmora.providers.simulated import SimulatedProvider
from modelmora.server import create_app
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "paneltoken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT = "/v1/chat/completions"


def _playwright() -> Any:
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (in the dev extra)"
    )
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium: bash .ci/setup-browser.sh installs Debian's")
    return playwright


@contextlib.contextmanager
def opened(url: str, *, token: str | None = TOKEN) -> Iterator[Any]:
    """A Chromium page on the status page at ``url``."""
    playwright = _playwright()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{url}/?token={token}" if token else url)
            yield page
        finally:
            browser.close()


def ollama_config(emu: OllamaEmulator, **extra: Any) -> dict[str, Any]:
    return {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}},
        "models": {
            "qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"},
            "small": {"provider": "ollama", "target": "llama3.2:3b", "memory": "3GB"},
            "ghost": {"provider": "ollama", "target": "no-such-model:1b", "memory": "2GB"},
        },
        **extra,
    }


@pytest.fixture
def emu(make_ollama: Callable[..., OllamaEmulator]) -> OllamaEmulator:
    return make_ollama(models={"qwen2.5:14b": "9GB", "llama3.2:3b": "3GB"})


def chat(url: str, model: str, **kwargs: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}]}
    return httpx.post(f"{url}{CHAT}", json=body, headers=AUTH, timeout=30, **kwargs)


def row(page: Any, name: str) -> str:
    return str(page.inner_text(f"#models tr[data-model='{name}']"))


def test_the_page_lists_every_registered_model_with_its_state(emu: OllamaEmulator) -> None:
    """Named failure: the page listed only resident models, and a failed load nowhere."""
    with ThreadedServer(create_app(ollama_config(emu), token=TOKEN)) as server:
        assert httpx.post(f"{server.url}/models/qwen/load", headers=AUTH, timeout=30).status_code == 200
        assert httpx.post(f"{server.url}/models/ghost/load", headers=AUTH, timeout=30).status_code >= 400
        with opened(server.url) as page:
            page.wait_for_selector("#models tr[data-model='ghost']", timeout=10_000)
            assert "ready" in row(page, "qwen") and "cuda:0 9.3 GB" in row(page, "qwen")
            assert "available" in row(page, "small")
            ghost = row(page, "ghost")
            assert "failed" in ghost and "no-such-model" in ghost  # the reason, from the runtime


def test_load_unload_and_pin_from_the_page(emu: OllamaEmulator) -> None:
    """Named failure: no load, unload or pin button; a forced unload needs a confirmation."""
    with ThreadedServer(create_app(ollama_config(emu), token=TOKEN)) as server, opened(server.url) as page:
        page.click("#models tr[data-model='small'] button[data-action=load]")
        page.wait_for_selector("#models tr[data-model='small'] .state:text-is('ready')", timeout=10_000)
        page.click("#models tr[data-model='small'] button[data-action=pin]")
        page.wait_for_selector("#models tr[data-model='small'] button[data-action=pin]:text-is('Unpin')")
        status = httpx.get(f"{server.url}/status", headers=AUTH).json()
        assert [m["pinned"] for m in status["models"] if m["name"] == "small"] == [True]
        page.click("#models tr[data-model='small'] button[data-action=pin]")  # unpin
        page.wait_for_selector("#models tr[data-model='small'] button[data-action=pin]:text-is('Pin')")
        status = httpx.get(f"{server.url}/status", headers=AUTH).json()
        assert [m["pinned"] for m in status["models"] if m["name"] == "small"] == [False]

        # a request in flight holds a lease: the plain unload is refused, the page asks first
        dialogs: list[str] = []
        with emu.generation_held():
            holder = threading.Thread(target=chat, args=(server.url, "small"))
            holder.start()
            page.wait_for_selector("#models tr[data-model='small'] .leases:text-is('1')", timeout=10_000)
            page.once("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.click("#models tr[data-model='small'] button[data-action=unload]")
            page.wait_for_function("document.querySelector('#toast').textContent.includes('kept')")
            assert dialogs and "lease" in dialogs[0]
            assert "ready" in row(page, "small")
            page.once("dialog", lambda d: (dialogs.append(d.message), d.accept()))
            page.click("#models tr[data-model='small'] button[data-action=unload]")
            # Ollama unloads a busy runner once its requests end, as the real one does
            page.wait_for_selector(
                "#models tr[data-model='small'] .state:text-is('unloading')", timeout=10_000
            )
        page.wait_for_selector("#models tr[data-model='small'] .state:text-is('available')", timeout=10_000)
        holder.join(30)
        assert len(dialogs) == 2


def test_recent_requests_are_kept_on_the_server_and_survive_a_reload(emu: OllamaEmulator) -> None:
    """Named failure: history lost on reload (the page kept nothing of the requests)."""
    with ThreadedServer(create_app(ollama_config(emu), token=TOKEN)) as server:
        assert chat(server.url, "small").status_code == 200  # waited for its load
        assert chat(server.url, "small").status_code == 200
        assert chat(server.url, "nope").status_code == 404
        with opened(server.url) as page:
            page.wait_for_selector("#requests tr[data-model='nope']", timeout=10_000)
            rows = page.locator("#requests tr[data-model]").all_inner_texts()
            assert len(rows) == 3
            newest, _, oldest = rows
            assert "nope" in newest and "404" in newest and CHAT in newest
            assert "small" in oldest and "200" in oldest and "waited" in oldest
            page.reload()
            page.wait_for_selector("#requests tr[data-model='nope']", timeout=10_000)
            assert page.locator("#requests tr[data-model]").count() == 3
            assert chat(server.url, "qwen").status_code == 200  # a live one joins the list
            page.wait_for_selector("#requests tr[data-model='qwen']", timeout=10_000)


def _line_top(page: Any, device: str, rgb: tuple[int, int, int]) -> float:
    """How far down the chart (0 top, 1 bottom) the highest pixel of colour ``rgb`` is."""
    return float(
        page.evaluate(
            """([device, rgb]) => {
            const c = document.querySelector(`canvas.chart[data-device="${device}"]`);
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
              const i = 4 * (y * c.width + x);
              if (Math.abs(d[i] - rgb[0]) < 12 && Math.abs(d[i+1] - rgb[1]) < 12 && Math.abs(d[i+2] - rgb[2]) < 12)
                return y / c.height;
            }
            return 2; }""",
            [device, list(rgb)],
        )
    )


def test_the_chart_is_scaled_to_the_budget_with_the_budget_line(emu: OllamaEmulator) -> None:
    """Named failure: the chart was scaled to the highest use seen (10.5 of 24 GB looked
    full) and had no budget line."""
    with ThreadedServer(create_app(ollama_config(emu), token=TOKEN)) as server:
        assert httpx.post(f"{server.url}/models/qwen/load", headers=AUTH, timeout=30).status_code == 200
        with opened(server.url) as page:
            page.wait_for_selector("#models tr[data-model='qwen'] .state:text-is('ready')", timeout=10_000)
            page.wait_for_function(  # two polls: a line, not a dot
                "document.querySelector('canvas.chart[data-device=\"cuda:0\"]')?.dataset.points >= 2",
                timeout=10_000,
            )
            chart = page.locator("canvas.chart[data-device='cuda:0']")
            scale = float(chart.get_attribute("data-scale") or 0)
            assert 24e9 <= scale <= 30e9, "the top of the chart is the budget (and a margin)"
            use = _line_top(page, "cuda:0", (0xD0, 0x77, 0x4A))
            budget = _line_top(page, "cuda:0", (0xC0, 0x30, 0x30))
            assert 0 < budget < 0.3, "the budget line is drawn near the top"
            assert 0.5 < use < 1, "9.3 of 24 GB is drawn below half the height"


def test_a_banner_for_every_problem() -> None:
    """Named failure: no banner when /health is degraded."""
    config = {
        "budgets": {"cuda:0": "24GB"},
        "reconcile_interval": 0.2,
        "providers": {"sim-a": {"type": "simulated"}, "sim-b": {"type": "simulated"}},
        "models": {
            "a": {"provider": "sim-a", "target": "a", "memory": "4GB"},
            "b": {"provider": "sim-b", "target": "b", "memory": "4GB"},
        },
    }
    mm = ModelManager(config)
    with ThreadedServer(create_app(mm, token=TOKEN)) as server, opened(server.url) as page:
        page.wait_for_selector("#models tr[data-model='a']", timeout=10_000)
        assert page.locator("#banners .banner").count() == 0
        for name in ("sim-a", "sim-b"):
            provider = mm.provider(name)
            assert isinstance(provider, SimulatedProvider)
            provider.reachable = False
        page.wait_for_function("document.querySelectorAll('#banners .banner').length == 2", timeout=10_000)
        banners = page.locator("#banners .banner").all_inner_texts()
        # one banner per runtime: its outage (since when, asked again when), not also its observe
        assert any(b.startswith("sim-a") and "unreachable since" in b for b in banners), banners
        assert any(b.startswith("sim-b") and "unreachable since" in b for b in banners), banners
        assert "degraded" in page.inner_text("#health")
        for name in ("sim-a", "sim-b"):
            mm.provider(name).reachable = True  # type: ignore[attr-defined]
        page.wait_for_function("document.querySelectorAll('#banners .banner').length == 0", timeout=10_000)


def test_stale_data_is_greyed_out_when_the_server_is_gone(emu: OllamaEmulator) -> None:
    """Named failure: rows still looked live after the server went away."""
    server = ThreadedServer(create_app(ollama_config(emu), token=TOKEN))
    with server, opened(server.url) as page:
        page.wait_for_selector("#models tr[data-model='qwen']", timeout=10_000)
        assert page.evaluate("getComputedStyle(document.querySelector('#models')).opacity") == "1"
        server.stop()
        page.wait_for_selector("body.stale", timeout=10_000)
        opacity = float(page.evaluate("getComputedStyle(document.querySelector('#models')).opacity"))
        assert opacity < 0.7
        assert "cannot reach" in page.inner_text("#health")
        # a server back on the same port: the page comes back to life
        with ThreadedServer(create_app(ollama_config(emu), token=TOKEN), port=server.port):
            page.wait_for_selector("body:not(.stale)", timeout=10_000)


def test_a_swap_with_a_queue_shows_segments_reservation_and_waiting_count(
    make_ollama: Callable[..., OllamaEmulator],
) -> None:
    """Named failures: a bare bar with no per-model segments or budget track (nothing at all
    at 0 B), and three queued requests shown as "leases 3" on a row in state loading."""
    emu = make_ollama(models={"qwen2.5:14b": "9GB", "llama3.2:3b": "3GB"})
    with ThreadedServer(create_app(ollama_config(emu), token=TOKEN)) as server, opened(server.url) as page:
        track = "#devices [data-device='cuda:0'] .track"
        page.wait_for_selector(track, timeout=10_000)  # drawn at 0 B too
        assert page.locator(f"{track} .seg").count() == 0
        assert httpx.post(f"{server.url}/models/small/load", headers=AUTH, timeout=30).status_code == 200
        page.wait_for_selector(f"{track} .seg[data-model='small']:not(.reserved)", timeout=10_000)
        width = page.locator(track).bounding_box()["width"]
        seg = page.locator(f"{track} .seg[data-model='small']").bounding_box()["width"]
        assert abs(seg / width - 3e9 / 24e9) < 0.02  # 3 GB (estimate) of a 24 GB track

        waiting: list[threading.Thread] = []
        with emu.loads_held():
            for _ in range(3):
                waiting.append(threading.Thread(target=chat, args=(server.url, "qwen")))
                waiting[-1].start()
            page.wait_for_selector(f"{track} .seg.reserved[data-model='qwen']", timeout=10_000)
            page.wait_for_selector(
                "#models tr[data-model='qwen'] .queued:text-is('3 waiting')", timeout=10_000
            )
            assert "loading" in row(page, "qwen")
            assert page.inner_text("#models tr[data-model='qwen'] .leases") == "0"
            assert page.locator(f"{track} .seg[data-model='small']:not(.reserved)").count() == 1
        for t in waiting:
            t.join(30)
        page.wait_for_selector(f"{track} .seg[data-model='qwen']:not(.reserved)", timeout=10_000)
