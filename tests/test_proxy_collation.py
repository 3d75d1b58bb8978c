"""Issue 25: 100 retrying clients alternating two models of one exclusive group through the
proxy; the swaps are counted and bounded by an argument, not by timing.

The clients run in rounds.  In round ``r`` client ``i`` asks for ``qwen`` when ``i + r`` is
even, else for ``mistral`` (50 of each), and retries a 429 or 503 after a short pause;
the next round starts when every client has its answer.  During a round's arrivals the
emulator holds loads and generation, so nothing a round asks for completes before all of
its 100 requests are in the server (``GET /requests`` lists them): when it is released,
the round is a fixed set of waiting requests with no arrival after it.

The bound, with ``X`` the model resident at the release and ``Y`` the other:

* a request for ``Y`` waits for an admission of ``Y``; while it waits, ``X``'s gate lets at
  most ``max_batch_before_swap`` more requests for ``X`` through, and queues the rest;
* ``X``'s leases end (nothing arrives to renew them), so ``Y`` is swapped in once, and
  every request for ``Y`` of the round — all already waiting — is served by that load;
* the requests for ``X`` left at its gate need ``X`` back: one more swap, and no request
  for ``Y`` is left to call ``Y`` back.

So a round costs at most 2 swaps (and at least 1: it asks for both models), the first round one load more (nothing is resident),
and ``R`` rounds at most ``2 R + 1`` loads, whatever the timing; a proxy that swapped per
request (no collation) would need up to 100 per round.  Each request's answer is checked
to come from the model it asked for.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from modelmora.server import create_app
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer

CLIENTS = 100
ROUNDS = 3
MODELS = {"qwen": "qwen2.5:14b", "mistral": "mistral-small:22b"}
OLLAMA_STRICT = True  # the real-like emulator, as benchmarks/load_proxy.py runs it


@pytest.fixture
def server(make_ollama: Callable[..., OllamaEmulator]) -> Iterator[tuple[str, OllamaEmulator]]:
    emu = make_ollama(models={t: "10GB" for t in MODELS.values()}, vram="48GB")
    config = {
        "budgets": {"cuda:0": "16GB"},
        # /v1 requests send no num_ctx: the provider loads with the one they get, so a
        # swap is one load (else Ollama reloads on the first /v1 request)
        "providers": {"ollama": {"base_url": emu.url, "num_ctx": v1_context(emu)}},
        "models": {
            n: {"provider": "ollama", "target": t, "memory": "10GB", "group": "heavy"}
            for n, t in MODELS.items()
        },
        # the time bound never fires here: the batch bound alone collates
        "scheduling": {"max_batch_before_swap": 4, "max_wait": "10m"},
    }
    served = ThreadedServer(create_app(config, queue_limit=CLIENTS, progress_after=600)).start()
    try:
        yield served.url, emu
    finally:
        served.stop()


def v1_context(emu: OllamaEmulator) -> int:
    """The context Ollama gives a request that sends none (as ``benchmarks/load_proxy.py``)."""
    assert emu.state.default_num_ctx is not None
    return min(emu.state.default_num_ctx, min(m.context_length for m in emu.state.catalogue.values()))


async def ask(http: httpx.AsyncClient, name: str, tag: str, refused: list[int]) -> str:
    """One streamed chat request, retried every 0.05 s while refused (429 or 503); the
    text of its answer."""
    body = {"model": name, "stream": True, "messages": [{"role": "user", "content": tag}]}
    while True:
        async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
            if reply.status_code in (429, 503):
                refused[0] += 1
                await reply.aread()
                await anyio.sleep(0.05)
                continue
            assert reply.status_code == 200, await reply.aread()
            text = []
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert event["model"] == name, event  # answered by the model asked for
                    text.append(event["choices"][0]["delta"].get("content") or "")
            return "".join(text)


async def one_round(http: httpx.AsyncClient, emu: OllamaEmulator, r: int, refused: list[int]) -> None:
    names = list(MODELS)
    answers: dict[int, str] = {}

    async def client(i: int) -> None:
        answers[i] = await ask(http, names[(i + r) % 2], f"round {r} client {i}", refused)

    with contextlib.ExitStack() as held:
        held.enter_context(emu.loads_held())
        held.enter_context(emu.generation_held())
        async with anyio.create_task_group() as tg:
            for i in range(CLIENTS):
                tg.start_soon(client, i)
            deadline = time.monotonic() + 60
            while len((await http.get("/requests")).json()) < CLIENTS:
                assert time.monotonic() < deadline, "the round's requests never all arrived"
                await anyio.sleep(0.02)
            held.close()  # released: the round is a fixed set of waiting requests
    assert sorted(answers) == list(range(CLIENTS))
    for i, text in answers.items():
        assert f"round {r} client {i}" in text, (i, text)


def test_100_retrying_clients_alternating_two_group_models_swap_at_most_twice_a_round(
    server: tuple[str, OllamaEmulator],
) -> None:
    url, emu = server
    refused = [0]
    per_round: list[int] = []

    async def main() -> None:
        # a connection per request: a kept-alive one the server closes as idle between two
        # rounds would race with its reuse (a ReadError that is no part of the test)
        limits = httpx.Limits(max_connections=CLIENTS + 2, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            for r in range(ROUNDS):
                before = emu.stats.loads
                await one_round(http, emu, r, refused)
                per_round.append(emu.stats.loads - before)

    anyio.run(main)
    report: dict[str, Any] = {"loads_per_round": per_round, "refused": refused[0], "stats": emu.stats}
    # each round asks for both models: one swap at least; the first round adds the first load
    assert 2 <= per_round[0] <= 3, report
    assert all(1 <= n <= 2 for n in per_round[1:]), report
    assert sum(per_round) <= 2 * ROUNDS + 1, report
