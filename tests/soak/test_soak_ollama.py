"""The soak workload against the Ollama emulator over real HTTP: failing loads (out of
memory), models evicted behind the manager's back, a server that refuses connections for
a while, cancellations; the emulator's own VRAM accounting must stay within the budget."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from modelmora import ModelManager
from modelmora.memory import StaticProbe
from modelmora.testing.ollama import OllamaEmulator

from .harness import GB, Faults, Soak, soak_ops

pytestmark = [pytest.mark.anyio, pytest.mark.soak]

CATALOGUE = {"qwen2.5:14b": "9GB", "mistral-small:22b": "13GB", "llama3.2:3b": "3GB",
             "phi4:14b": "10GB", "nomic-embed-text": {"size": "300MB", "embedding": True}}  # fmt: skip


def emulator_faults(emu: OllamaEmulator) -> Faults:
    def held() -> dict[str, int]:
        with emu.state.lock:
            return {"cuda:0": sum(r.size_vram for r in emu.state.runners.values())}

    def set_reachable(on: bool) -> None:
        (emu.start if on else emu.stop)()

    return Faults(
        fail_next=emu.oom_next,
        hang_next=None,
        unhang=lambda t: None,
        evict=emu.evict,
        set_reachable=set_reachable,
        held=held,
    )


async def test_soak_on_the_ollama_emulator(make_ollama: Callable[..., OllamaEmulator]) -> None:
    # the strict emulator: Ollama's names (nomic-embed-text:latest), 80 % rule, time in flight
    emu = make_ollama(models=CATALOGUE, vram="48GB", max_loaded=8, strict=True)
    targets = {"qwen": "qwen2.5:14b", "mistral": "mistral-small:22b", "llama": "llama3.2:3b",
               "phi": "phi4:14b", "embed": "nomic-embed-text"}  # fmt: skip
    models = {
        name: {"provider": "ollama", "target": target, "memory": CATALOGUE[target] if isinstance(CATALOGUE[target], str) else "300MB",
               "keep_alive": ttl, "load_timeout": 5, "group": "big" if name in ("mistral", "phi") else None,
               **({"options": {"kind": "embedding"}} if name == "embed" else {})}
        for (name, target), ttl in zip(targets.items(), [0, 0.05, 1, 0, -1], strict=True)
    }  # fmt: skip
    config = {
        "budgets": {"cuda:0": "24GB"}, "models": models, "wait_timeout": 0.5, "reconcile_interval": 0.1,
        "failure_cooldown": 0.01, "failure_cooldown_max": 0.05, "outage_cooldown": 0.01, "outage_cooldown_max": 0.05, "unload_timeout": 5, "reaper_interval": 0.02,
        "providers": {"ollama": {"base_url": emu.url, "retries": 2, "retry_initial": 0.01, "retry_max": 0.05,
                                 "timeout": 5, "unload_timeout": 5, "poll_interval": 0.01}},
    }  # fmt: skip
    async with ModelManager(config, probe=StaticProbe({})) as mm:
        soak = Soak(mm, emulator_faults(emu), list(models), {"cuda:0": 24 * GB}, seed=21)
        result = await soak.run(soak_ops(300))
        if not emu.running:
            emu.start()
        for entry in mm.entries():
            assert entry.leases == 0, entry
        await mm.unload_all(force=True)
        assert mm.entries() == [] and emu.loaded() == [], "something stayed loaded"
    summary = result.summary()
    print(json.dumps(summary))
    assert not result.violations, result.violations[:5]
    assert summary["faults_injected"] > 20 and result.outcomes["lease ok"] > 20
