"""A stand-in for vLLM's OpenAI server, for tests on machines that cannot run vLLM.

    python -m modelmora.testing.vllm --model Qwen/Qwen2.5-0.5B --port 8000 --enable-sleep-mode

It takes vLLM's own arguments and follows its behaviour where modelmora depends on it, as
vLLM 0.11's ``vllm/entrypoints/openai/api_server.py`` and ``docs/features/sleep_mode.md``
describe it (github.com/vllm-project/vllm):

* the port opens only once the "weights" are loaded (connections are refused while
  loading); ``/health`` answers an empty 200 while the engine lives and 503 once it is
  dead, and then the process exits (``check_health`` raising ``EngineDeadError``);
  ``/v1/models`` lists the served name; ``/metrics`` has the Prometheus gauges
  ``vllm:num_requests_running`` and ``vllm:num_requests_waiting``;
* with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1`` (the dev-mode routes):
  ``POST /sleep?level=1|2`` (empty 200), ``POST /wake_up`` with optional repeated
  ``tags=weights|kv_cache`` (empty 200), ``GET /is_sleeping`` (true until every tag is
  awake) and ``POST /collective_rpc`` ``{"method": "reload_weights"}``;
* **level 2 discards the weights**: after ``/sleep?level=2`` a wake re-allocates the memory
  but the weights are garbage — completions come back as nonsense — until
  ``/collective_rpc`` ``reload_weights`` loads them again (the sleep-mode docs' sequence:
  ``wake_up?tags=weights``, ``reload_weights``, ``wake_up?tags=kv_cache``);
* **a busy or sleeping engine crashes**, as vLLM 0.11 can: ``/sleep`` with requests in
  flight still answers 200 but kills the engine, and so does a generation request to a
  sleeping engine (answered 500); the engine then reports 503 on ``/health`` and the
  process exits ``MODELMORA_STANDIN_EXIT_DELAY`` seconds later (default 0.2).

Completions echo the prompt, like the Ollama emulator.  Timings (seconds) come from
``MODELMORA_STANDIN_LOAD_DELAY`` (cold start), ``MODELMORA_STANDIN_WAKE_DELAY`` and
``MODELMORA_STANDIN_TOKEN_DELAY`` (per streamed token).

Not modelled: memory.  The stand-in holds no GPU, so what a sleeping engine keeps on the
GPU (its CUDA context and graphs; vLLM frees only the weight and KV-cache pool) cannot be
measured here — the provider counts a documented allowance where NVML is absent.  Newer
vLLM's ``/sleep?tags=…&mode=abort`` (aborting requests instead of crashing) is not
modelled either: modelmora pins 0.11, which has neither.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

TAGS = ("weights", "kv_cache")


@dataclass
class EngineState:
    model: str
    served: str
    max_model_len: int
    sleep_mode: bool
    wake_delay: float = 0.0  # seconds a wake takes (x3 after level 2)
    token_delay: float = 0.0  # seconds per streamed token
    asleep: set[str] = field(default_factory=set)  # memory tags that are asleep
    level: int = 0
    weights_discarded: bool = False  # level 2: garbage until reload_weights
    running: int = 0  # requests in flight
    dead: str | None = None  # why the engine died
    on_death: Callable[[], None] | None = None

    @property
    def sleeping(self) -> bool:
        return bool(self.asleep)

    def die(self, why: str) -> None:
        if self.dead is None:
            self.dead = why
            if self.on_death is not None:
                self.on_death()


def _echo(text: str) -> list[str]:
    return ["Echo:", *[" " + w for w in text.split()[:16]]]


def _garbage(text: str) -> list[str]:
    """What a model with unloaded weights says: nothing about the prompt."""
    return [" !!", "!!", " \ufffd", "\ufffd"] * max(1, len(text.split()) // 2)


def build_app(state: EngineState, *, dev_mode: bool) -> Starlette:
    def dead_error() -> Response:
        return JSONResponse(
            {"object": "error", "message": f"EngineCore encountered an issue: {state.dead}", "type": "EngineDeadError", "code": 500},
            status_code=500,
        )  # fmt: skip

    async def health(request: Request) -> Response:
        return Response(status_code=503 if state.dead else 200)

    async def metrics(request: Request) -> Response:
        labels = f'engine="0",model_name="{state.served}"'
        return PlainTextResponse(
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{labels}}} {float(state.running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{labels}}} 0.0\n"
        )

    async def models(request: Request) -> Response:
        return JSONResponse({
            "object": "list",
            "data": [{"id": state.served, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                      "root": state.model, "parent": None, "max_model_len": state.max_model_len}],
        })  # fmt: skip

    async def generate(request: Request, chat: bool) -> Response:
        if state.dead:
            return dead_error()
        if state.sleeping:  # vLLM 0.11: the engine core fails on a batch with no memory
            state.die("a request reached a sleeping engine")
            return dead_error()
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
        words = _garbage(prompt) if state.weights_discarded else _echo(prompt)
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not data.get("stream"):
            state.running += 1
            try:  # the request is in flight for as long as its tokens take
                for _ in words:
                    await (
                        anyio.sleep(state.token_delay) if state.token_delay else anyio.lowlevel.checkpoint()
                    )
            finally:
                state.running -= 1
            if state.dead:
                return dead_error()
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
            state.running += 1
            try:
                for word in words:
                    if state.dead:  # the engine died under this request
                        yield f"data: {json.dumps({'error': {'message': state.dead, 'type': 'EngineDeadError'}})}\n\n".encode()
                        return
                    delta: dict[str, Any] = {"delta": {"content": word}} if chat else {"text": word}
                    piece = {"id": "cmpl-standin", "object": f"{kind}.chunk" if chat else kind, "created": created,
                             "model": state.served, "choices": [{"index": 0, "finish_reason": None, **delta}]}  # fmt: skip
                    yield f"data: {json.dumps(piece)}\n\n".encode()
                    if state.token_delay:
                        await anyio.sleep(state.token_delay)
                    else:
                        await anyio.lowlevel.checkpoint()
                yield b"data: [DONE]\n\n"
            finally:
                state.running -= 1

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def chat(request: Request) -> Response:
        return await generate(request, True)

    async def completions(request: Request) -> Response:
        return await generate(request, False)

    async def sleep(request: Request) -> Response:
        if not state.sleep_mode:
            return JSONResponse({"error": "Sleep mode is not enabled (--enable-sleep-mode)"}, status_code=400)
        if state.dead:
            return dead_error()
        level = int(request.query_params.get("level", "1"))
        if level not in (1, 2):
            return JSONResponse({"error": f"invalid sleep level {level}"}, status_code=400)
        if state.running:  # vLLM 0.11 frees the memory under the running batch: 200, then dead
            state.die(f"slept (level {level}) with {state.running} request(s) in flight")
            return Response(status_code=200)
        state.asleep, state.level = set(TAGS), level
        state.weights_discarded = state.weights_discarded or level == 2
        return Response(status_code=200)

    async def wake_up(request: Request) -> Response:
        if state.dead:
            return dead_error()
        tags = request.query_params.getlist("tags") or list(TAGS)
        if state.asleep & set(tags):
            await anyio.sleep(state.wake_delay * (3 if state.weights_discarded else 1))
        state.asleep -= set(tags)
        if not state.asleep:
            state.level = 0
        return Response(status_code=200)

    async def is_sleeping(request: Request) -> Response:
        return JSONResponse({"is_sleeping": state.sleeping})

    async def collective_rpc(request: Request) -> Response:
        if state.dead:
            return dead_error()
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return JSONResponse({"detail": f"JSON decode error: {exc}"}, status_code=400)
        method = body.get("method") if isinstance(body, dict) else None
        if method is None:
            return JSONResponse({"detail": "Missing 'method' in request body"}, status_code=400)
        if method != "reload_weights":
            return JSONResponse(
                {"detail": f"the stand-in's worker has no method {method!r}"}, status_code=500
            )
        if "weights" in state.asleep:
            return JSONResponse({"detail": "reload_weights: the weights' memory is asleep; wake_up?tags=weights first"}, status_code=500)  # fmt: skip
        state.weights_discarded = False
        return JSONResponse({"results": [None]})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    if dev_mode:  # vLLM registers the sleep endpoints only in dev mode
        routes += [
            Route("/sleep", sleep, methods=["POST"]),
            Route("/wake_up", wake_up, methods=["POST"]),
            Route("/is_sleeping", is_sleeping, methods=["GET"]),
            Route("/collective_rpc", collective_rpc, methods=["POST"]),
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
    exit_delay = float(os.environ.get("MODELMORA_STANDIN_EXIT_DELAY", "0.2"))

    def exit_soon() -> None:
        print(f"ERROR: engine dead ({state.dead}); exiting", flush=True)
        threading.Timer(exit_delay, os._exit, (1,)).start()

    state = EngineState(
        model=args.model,
        served=(args.served_model_name or [args.model])[0],
        max_model_len=args.max_model_len,
        sleep_mode=args.enable_sleep_mode,
        wake_delay=float(os.environ.get("MODELMORA_STANDIN_WAKE_DELAY", "0")),
        token_delay=float(os.environ.get("MODELMORA_STANDIN_TOKEN_DELAY", "0")),
        on_death=exit_soon,
    )
    print(f"INFO: loading {args.model} (stand-in)", flush=True)
    time.sleep(float(os.environ.get("MODELMORA_STANDIN_LOAD_DELAY", "0")))  # the port stays closed meanwhile
    app = build_app(state, dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE") == "1")
    print(f"INFO: serving {state.served} on {args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
