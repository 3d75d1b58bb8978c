"""Time to first token after an unload and reload, with and without ``keep_prompt_cache``.

    python benchmarks/bench_llamacpp_prompt_cache.py

A ~128 MB random-weight GGUF on the C++ ``llama-server`` (``llamacpp`` provider): one
request with a 180-token prompt, unload, load again, then a request sharing all but the
last word.  Reported from the server's own timings (prompt tokens evaluated, prompt ms) and
the client's wall time for the 1-token request.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio
import httpx

from modelmora import ModelManager
from modelmora.memory import StaticProbe
from modelmora.providers.llamacpp import find_llama_server
from modelmora.testing.gguf import make_tiny_gguf


async def run(tmp: Path, gguf: Path, keep: bool) -> str:
    cfg = {
        "budgets": {"cpu": "4GB"},
        "providers": {"llamacpp": {"binary": find_llama_server(), "state_dir": str(tmp / f"state-{keep}")}},
        "models": {
            "m": {
                "provider": "llamacpp", "target": str(gguf), "device": "cpu",
                "options": {"ctx_size": 256, "parallel": 1, "keep_prompt_cache": keep},
            }
        },
    }  # fmt: skip
    prefix = "the a " * 35

    async def ask(endpoint: str | None, prompt: str) -> dict[str, float]:
        body = {"prompt": prompt, "n_predict": 1, "cache_prompt": True}
        reply = await client.post(f"{endpoint}/completion", json=body)
        return dict(reply.json()["timings"])

    async with ModelManager(cfg, probe=StaticProbe({})) as mm, httpx.AsyncClient(timeout=120) as client:
        async with mm.use("m") as handle:
            first = await ask(handle.endpoint, prefix + "one")
        await mm.unload("m")
        async with mm.use("m") as handle:
            started = time.perf_counter()
            again = await ask(handle.endpoint, prefix + "two")
            wall = time.perf_counter() - started
        await mm.unload("m")
    return (
        f"| {'on' if keep else 'off'} | {first['prompt_n']:.0f} | {again['prompt_n']:.0f} "
        f"| {again['prompt_ms']:.0f} | {wall * 1000:.0f} |"
    )


async def main() -> None:
    if find_llama_server() is None:
        sys.exit("no llama-server: bash .ci/setup-llama-server.sh or set MODELMORA_LLAMA_SERVER")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = make_tiny_gguf(Path(tmp) / "m.gguf", layers=3, hidden=1024)
        print("| keep_prompt_cache | prompt tokens, 1st | after reload | prompt ms | request ms |")
        print("|---|---|---|---|---|")
        for keep in (False, True):
            print(await run(Path(tmp), gguf, keep))


if __name__ == "__main__":
    anyio.run(main)
