"""Make the status page screenshots in docs/ with Playwright and Debian's Chromium:

    PYTHONPATH=src python docs/screenshots.py [--out docs]

against an emulated Ollama (modelmora.testing.ollama) and a simulated runtime, so no GPU is
needed.  Three pictures: ``status-page-idle.png`` (models resident, recent requests),
``status-page-swap.png`` (an exclusive group swapping while three requests wait),
``status-page-degraded.png`` (a runtime unreachable: a banner per problem).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from modelmora.core import ModelManager
from modelmora.server import create_app
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer

TOKEN = "docs"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def config(emu: OllamaEmulator) -> dict[str, Any]:
    return {
        "budgets": {"cuda:0": "24GB"},
        "reconcile_interval": 1,
        "providers": {"ollama": {"base_url": emu.url}, "sim": {"type": "simulated"}},
        "models": {
            "qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB", "group": "chat"},
            "mistral": {
                "provider": "ollama",
                "target": "mistral-small:22b",
                "memory": "13GB",
                "group": "chat",
            },
            "embed": {"provider": "ollama", "target": "nomic-embed-text", "memory": "300MB", "pinned": True},
            "reranker": {"provider": "sim", "target": "bge-reranker", "memory": "1.2GB"},
            "whisper": {"provider": "sim", "target": "whisper-large-v3", "memory": "3GB"},
        },
    }


def chat(url: str, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Summarise the meeting notes"}]}
    httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    out = parser.parse_args(argv).out
    from playwright.sync_api import sync_playwright

    models = {"qwen2.5:14b": "9GB", "mistral-small:22b": "13GB", "nomic-embed-text": "300MB"}
    with OllamaEmulator(strict=False, models=models, vram="48GB", load_delay=0.3) as emu:
        mm = ModelManager(config(emu))
        with ThreadedServer(create_app(mm, token=TOKEN, title="gpu-box")) as server, sync_playwright() as p:
            for name in ("embed", "reranker"):
                httpx.post(f"{server.url}/models/{name}/load", headers=AUTH, timeout=60).raise_for_status()
            for _ in range(3):
                chat(server.url, "qwen")
            httpx.post(f"{server.url}/v1/embeddings", json={"model": "embed", "input": "hello"}, headers=AUTH)
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{server.url}/?token={TOKEN}")
            page.wait_for_selector("#models tr[data-model='qwen'] .state:text-is('ready')")
            time.sleep(3)  # a few points on the charts
            page.screenshot(path=str(out / "status-page-idle.png"), full_page=True)

            with emu.loads_held():  # mistral's load lasts until the picture is taken
                waiting = [threading.Thread(target=chat, args=(server.url, "mistral")) for _ in range(3)]
                for t in waiting:
                    t.start()
                page.wait_for_selector("#models tr[data-model='mistral'] .queued:text-is('3 waiting')")
                page.wait_for_selector("#devices .seg.reserved[data-model='mistral']")
                time.sleep(1.5)
                page.screenshot(path=str(out / "status-page-swap.png"), full_page=True)
            for t in waiting:
                t.join(60)

            sim = mm.provider("sim")
            sim.reachable = False  # type: ignore[attr-defined]
            with emu.refuse_connections():
                page.wait_for_function(
                    "document.querySelectorAll('#banners .banner').length >= 2", timeout=30_000
                )
                time.sleep(1)
                page.screenshot(path=str(out / "status-page-degraded.png"), full_page=True)
            sim.reachable = True  # type: ignore[attr-defined]
            browser.close()
    for name in ("idle", "swap", "degraded"):
        print(out / f"status-page-{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
