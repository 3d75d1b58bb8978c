"""A stand-in for vLLM's OpenAI server, for tests on machines that cannot run vLLM.

    python -m modelmora.testing.vllm --model Qwen/Qwen2.5-0.5B --port 8000 --enable-sleep-mode

It takes vLLM's own arguments and follows its documented behaviour where the manager
depends on it: the port opens only once the "weights" are loaded (connections are refused
while loading), ``/health`` answers an empty 200, ``/v1/models`` lists the served name,
and with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1`` it has ``POST
/sleep?level=1|2`` (empty 200), ``POST /wake_up`` (empty 200) and ``GET /is_sleeping``.
A sleeping engine refuses generation.  Completions echo the prompt, like the Ollama
emulator.  Timings come from ``MODELMORA_STANDIN_LOAD_DELAY`` (cold start) and
``MODELMORA_STANDIN_WAKE_DELAY`` (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class EngineState:
    model: str
    served: str
    max_model_len: int
    sleep_mode: bool
    wake_delay: float = 0.0
    sleeping: bool = False
    level: int = 0
    weights_discarded: bool = False


def _echo(text: str) -> list[str]:
    return ["Echo:", *[" " + w for w in text.split()[:16]]]


def build_app(state: EngineState, *, dev_mode: bool) -> Starlette:
    def refuse_if_sleeping() -> Response | None:
        if state.sleeping:
            return JSONResponse(
                {"object": "error", "message": "the engine is sleeping; POST /wake_up first", "type": "BadRequestError", "code": 503},
                status_code=503,
            )  # fmt: skip
        return None

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def models(request: Request) -> Response:
        return JSONResponse({
            "object": "list",
            "data": [{"id": state.served, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                      "root": state.model, "parent": None, "max_model_len": state.max_model_len}],
        })  # fmt: skip

    async def generate(request: Request, chat: bool) -> Response:
        refused = refuse_if_sleeping()
        if refused is not None:
            return refused
        data = await request.json()
        if data.get("model") not in (state.served, None):
            return JSONResponse(
                {"object": "error", "message": f"The model `{data.get('model')}` does not exist.", "type": "NotFoundError", "code": 404},
                status_code=404,
            )  # fmt: skip
        if chat:
            messages = data.get("messages") or [{}]
            prompt = str(messages[-1].get("content", ""))
        else:
            prompt = str(data.get("prompt", ""))
        words = _echo(prompt)
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not data.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            choice |= (
                {"message": {"role": "assistant", "content": "".join(words)}}
                if chat
                else {"text": "".join(words)}
            )
            return JSONResponse({"id": "cmpl-standin", "object": kind, "created": created, "model": state.served,
                                 "choices": [choice], "usage": {"prompt_tokens": len(prompt.split()),
                                 "completion_tokens": len(words), "total_tokens": len(prompt.split()) + len(words)}})  # fmt: skip

        async def sse() -> AsyncIterator[bytes]:
            for word in words:
                delta: dict[str, Any] = {"delta": {"content": word}} if chat else {"text": word}
                piece = {"id": "cmpl-standin", "object": f"{kind}.chunk" if chat else kind, "created": created,
                         "model": state.served, "choices": [{"index": 0, "finish_reason": None, **delta}]}  # fmt: skip
                yield f"data: {json.dumps(piece)}\n\n".encode()
                await anyio.lowlevel.checkpoint()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def chat(request: Request) -> Response:
        return await generate(request, True)

    async def completions(request: Request) -> Response:
        return await generate(request, False)

    async def sleep(request: Request) -> Response:
        if not state.sleep_mode:
            return JSONResponse({"error": "Sleep mode is not enabled (--enable-sleep-mode)"}, status_code=400)
        level = int(request.query_params.get("level", "1"))
        if level not in (1, 2):
            return JSONResponse({"error": f"invalid sleep level {level}"}, status_code=400)
        state.sleeping, state.level = True, level
        state.weights_discarded = level == 2
        return Response(status_code=200)

    async def wake_up(request: Request) -> Response:
        if state.sleeping:
            await anyio.sleep(state.wake_delay * (3 if state.weights_discarded else 1))
        state.sleeping, state.level, state.weights_discarded = False, 0, False
        return Response(status_code=200)

    async def is_sleeping(request: Request) -> Response:
        return JSONResponse({"is_sleeping": state.sleeping})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    if dev_mode:  # vLLM registers the sleep endpoints only in dev mode
        routes += [
            Route("/sleep", sleep, methods=["POST"]),
            Route("/wake_up", wake_up, methods=["POST"]),
            Route("/is_sleeping", is_sleeping, methods=["GET"]),
        ]
    return Starlette(routes=routes)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """vLLM's arguments that matter here; unknown ones are accepted and ignored, as a
    stand-in must not fail on flags the real server takes."""
    parser = argparse.ArgumentParser(prog="modelmora.testing.vllm")
    parser.add_argument("model_tag", nargs="?")
    parser.add_argument("--model")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    args, _ = parser.parse_known_args(argv)
    args.model = args.model or args.model_tag or "facebook/opt-125m"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    state = EngineState(
        model=args.model,
        served=(args.served_model_name or [args.model])[0],
        max_model_len=args.max_model_len,
        sleep_mode=args.enable_sleep_mode,
        wake_delay=float(os.environ.get("MODELMORA_STANDIN_WAKE_DELAY", "0")),
    )
    print(f"INFO: loading {args.model} (stand-in)", flush=True)
    time.sleep(float(os.environ.get("MODELMORA_STANDIN_LOAD_DELAY", "0")))  # the port stays closed meanwhile
    app = build_app(state, dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE") == "1")
    print(f"INFO: serving {state.served} on {args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
