"""What naming the requested model in answers costs the proxy (issue 26).

    python benchmarks/bench_model_rename.py [--requests 400]

1. The renaming itself (``modelmora.server.proxy.ModelRenamer``) on answers of the usual
   shapes: a chat completion, a stream of 50 events, an embeddings answer of ~1 MB.
2. End to end through ``modelmora serve``'s hot path, in front of the Ollama emulator: one
   runtime model registered twice, as ``qwen2.5:14b`` (the runtime's own name: the answer
   passes through untouched, with its length) and as ``qwen`` (renamed, sent chunked).
   Requests alternate between the two, so both see the same machine; the report gives the
   median and p90 latency of each and their difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import httpx

from modelmora.server import create_app
from modelmora.server.proxy import ModelRenamer
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer


def chat_answer() -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "qwen2.5:14b",
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 60}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 60, "total_tokens": 80},
        }
    ).encode()  # fmt: skip


def stream_answer(events: int = 50) -> list[bytes]:
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "qwen2.5:14b"}
    return [
        f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': {'content': 'word '}}]})}\n\n".encode()
        for _ in range(events)
    ] + [b"data: [DONE]\n\n"]


def embeddings_answer(vectors: int = 64, size: int = 1024) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": [0.0123456] * size} for i in range(vectors)]
    return json.dumps({"object": "list", "data": data, "model": "nomic-embed-text"}).encode()


def micro(repeat: int) -> dict[str, float]:
    """Microseconds per answer."""
    out = {}
    chat = chat_answer()
    chunks = [chat[i : i + 256] for i in range(0, len(chat), 256)]
    events = stream_answer()
    embed = embeddings_answer()
    embed_chunks = [embed[i : i + 65536] for i in range(0, len(embed), 65536)]
    cases: dict[str, tuple[list[bytes], bool]] = {
        f"chat completion ({len(chat)} B)": (chunks, False),
        f"stream of {len(events)} events": (events, True),
        f"embeddings ({len(embed) / 1e6:.1f} MB)": (embed_chunks, False),
    }
    for label, (parts, stream) in cases.items():
        n = repeat if len(parts) < 100 and "MB" not in label else max(10, repeat // 100)
        start = time.perf_counter()
        for _ in range(n):
            renamer = ModelRenamer("qwen", stream=stream)
            for part in parts:
                renamer.feed(part)
            renamer.end()
        out[label] = (time.perf_counter() - start) / n * 1e6
    return out


def end_to_end(requests: int) -> dict[str, dict[str, float]]:
    emu = OllamaEmulator(models={"qwen2.5:14b": "9GB"}).start()
    config: dict[str, Any] = {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}},
        "models": {
            "qwen2.5:14b": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"},
            "qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"},
        },
    }
    server = ThreadedServer(create_app(config)).start()
    times: dict[str, list[float]] = {"qwen2.5:14b": [], "qwen": []}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            body = {"messages": [{"role": "user", "content": "hello"}]}
            for name in times:  # load, and warm both paths
                for _ in range(20):
                    assert (
                        client.post("/v1/chat/completions", json={"model": name, **body}).status_code == 200
                    )
            for i in range(requests):
                name = ("qwen2.5:14b", "qwen")[i % 2]
                start = time.perf_counter()
                reply = client.post("/v1/chat/completions", json={"model": name, **body})
                times[name].append(time.perf_counter() - start)
                assert reply.status_code == 200 and reply.json()["model"] == name, reply.text
    finally:
        server.stop()
        emu.stop()
    out = {}
    for name, seen in times.items():
        seen.sort()
        out[name] = {"median_ms": statistics.median(seen) * 1e3, "p90_ms": seen[int(len(seen) * 0.9)] * 1e3}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    print("renaming alone (µs per answer):")
    for label, us in micro(args.repeat).items():
        print(f"  {label:32} {us:9.1f}")
    e2e = end_to_end(args.requests)
    same, renamed = e2e["qwen2.5:14b"], e2e["qwen"]
    print(f"end to end, hot path, {args.requests // 2} requests each (ms):")
    print(f"  as the runtime names it  median {same['median_ms']:.3f}  p90 {same['p90_ms']:.3f}")
    print(f"  renamed                  median {renamed['median_ms']:.3f}  p90 {renamed['p90_ms']:.3f}")
    print(f"  difference               median {renamed['median_ms'] - same['median_ms']:+.3f}")


if __name__ == "__main__":
    main()
