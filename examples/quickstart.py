"""Leases, exclusive groups and eviction on the simulated runtime (no GPU needed).

    python examples/quickstart.py

Two concurrent users share one load of qwen-14b; SDXL then evicts it (both are in the
exclusive group `heavy`) while the light TTS model stays.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from modelmora import ModelManager, events

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "modelmora.yaml"


async def main() -> None:
    async with ModelManager(CONFIG) as mm:
        mm.events.subscribe(
            lambda e: (
                print("  event:", events.describe(e))
                if not isinstance(e, events.LeaseAcquired | events.LeaseReleased)
                else None
            )
        )

        async def user(i: int) -> None:
            async with mm.use("qwen-14b") as model:
                print(f"user {i} got {model.name} ({mm.leases('qwen-14b')} lease(s))")
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(user, 1)
            tg.start_soon(user, 2)

        async with mm.use("gpt-sovits"), mm.use("sdxl-base"):
            print("resident now:", mm.loaded())
        print(mm)
        await mm.unload_all()


if __name__ == "__main__":
    anyio.run(main)
