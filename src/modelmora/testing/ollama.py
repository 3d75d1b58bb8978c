"""An Ollama server on loopback that behaves like the real one, for tests without a GPU.

    with OllamaEmulator(vram="24GB", models={"mistral-small:22b": "13GB"}) as ollama:
        client = httpx.Client(base_url=ollama.url)

It implements what modelmora and most clients use, with Ollama's documented semantics
(docs/api.md, server/routes.go, server/sched.go): loading on an empty prompt
(``done_reason: "load"``), unloading with ``keep_alive: 0`` (answered before the memory is
free — the model stays in ``/api/ps`` for ``unload_delay``), ``keep_alive`` parsed like Go
(numbers are seconds, negative is forever, strings are Go durations, a bare ``"300"`` is
rejected), expiry timers, ``OLLAMA_MAX_LOADED_MODELS``, a VRAM budget with Ollama's victim
choice (idle runners first, shortest keep-alive first), reloads when runner options
differ, NDJSON streaming, the OpenAI-compatible ``/v1`` endpoints, and fault injection.

It is a test double, never a runtime: every answer is deterministic text, and every
embedding a deterministic unit vector.

From a shell, for trying modelmora by hand (the README's example sessions were made so)::

    python -m modelmora.testing.ollama --port 11499 \
        --models 'qwen2.5:14b=9GB,mistral-small:22b=13GB,nomic-embed-text=300MB' --vram 24GB
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import anyio
import anyio.lowlevel
import typer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..spec import format_size, parse_duration, parse_size
from .threaded import ThreadedServer, free_port

FOREVER_S = 292 * 365 * 86400.0  # Go's max duration, as Ollama reports an infinite keep_alive
RUNNER_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "low_vram"}
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class KeepAliveError(ValueError):
    pass


def parse_go_duration(text: str) -> float:
    """Go's time.ParseDuration: "10m", "1h30m", "-1m", "0"; a bare "300" has no unit."""
    s = text
    sign = 1.0
    if s and s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise KeepAliveError(f'time: invalid duration "{text}"')
    parts = _GO_PART.findall(s)
    if "".join(n + u for n, u in parts) != s:
        if re.fullmatch(r"\d+(\.\d*)?", s):
            raise KeepAliveError(f'time: missing unit in duration "{text}"')
        raise KeepAliveError(f'time: invalid duration "{text}"')
    return sign * sum(float(n) * _GO_UNITS[u] for n, u in parts)


def parse_keep_alive(value: Any, default: float) -> float:
    """Seconds; ``math.inf`` for forever.  ``None`` (omitted) → the server default."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise KeepAliveError(
            f"json: cannot unmarshal {type(value).__name__} into Go value of type api.Duration"
        )
    seconds = float(value) if not isinstance(value, str) else parse_go_duration(value)
    return math.inf if seconds < 0 else seconds


@dataclass
class CatalogueModel:
    """A model the emulated server has "pulled"."""

    name: str
    size: int
    family: str = "llama"
    parameter_size: str = "7B"
    quantization_level: str = "Q4_K_M"
    context_length: int = 8192
    embedding: bool = False
    kv_bytes_per_token: int = 131072  # how much each token of num_ctx adds

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


@dataclass
class Runner:
    model: CatalogueModel
    options: dict[str, Any]
    keep_alive: float
    expires_at: float  # monotonic; inf = never
    size: int
    size_vram: int
    in_flight: int = 0
    loaded_at: float = field(default_factory=time.monotonic)
    unloading_until: float | None = None  # still listed in /api/ps until then
    loading: bool = False  # VRAM is reserved while the weights load

    @property
    def num_ctx(self) -> int:
        return int(self.options.get("num_ctx", 2048))


@dataclass
class EmulatorStats:
    loads: int = 0
    unloads: int = 0
    reloads: int = 0
    evictions: int = 0
    requests: int = 0
    keep_alives: list[Any] = field(default_factory=list)  # what clients sent, in order


class OllamaState:
    """The scheduler: what is loaded, what expires, who gets evicted."""

    def __init__(
        self,
        models: Mapping[str, CatalogueModel],
        *,
        vram: int,
        max_loaded: int,
        default_keep_alive: float,
        load_delay: float,
        unload_delay: float,
        version: str,
        report_context_length: bool,
    ):
        self.catalogue = dict(models)
        self.vram = vram
        self.max_loaded = max_loaded
        self.default_keep_alive = default_keep_alive
        self.load_delay = load_delay
        self.unload_delay = unload_delay
        self.version = version
        self.report_context_length = report_context_length
        self.runners: dict[str, Runner] = {}
        self.stats = EmulatorStats()
        self.journal: list[tuple[str, dict[str, Any]]] = []  # (path, JSON body) of every request with one
        self.busy = 0  # next N requests answer 503
        self.oom: set[str] = set()  # next load of these answers 500 out of memory
        self.lock = threading.RLock()

    # -- time --------------------------------------------------------------------------

    def expire(self) -> None:
        """Drop expired idle runners and finish unloads whose delay has passed."""
        now = time.monotonic()
        with self.lock:
            for name, r in list(self.runners.items()):
                if r.unloading_until is not None:
                    if now >= r.unloading_until:
                        del self.runners[name]
                        self.stats.unloads += 1
                elif r.in_flight == 0 and not r.loading and now >= r.expires_at:
                    self._begin_unload(name)

    def _begin_unload(self, name: str) -> None:
        r = self.runners[name]
        if r.unloading_until is None:
            r.unloading_until = time.monotonic() + self.unload_delay
            if self.unload_delay == 0:
                del self.runners[name]
                self.stats.unloads += 1

    def evict_now(self, name: str) -> None:
        """Behind the client's back, as an OOM kill or another client's request would."""
        with self.lock:
            if name in self.runners:
                del self.runners[name]
                self.stats.unloads += 1
                self.stats.evictions += 1

    # -- scheduling --------------------------------------------------------------------

    def model(self, name: str) -> CatalogueModel | None:
        if name in self.catalogue:
            return self.catalogue[name]
        if ":" not in name and f"{name}:latest" in self.catalogue:
            return self.catalogue[f"{name}:latest"]
        return None

    def _footprint(self, model: CatalogueModel, options: Mapping[str, Any]) -> int:
        extra_ctx = max(0, int(options.get("num_ctx", 2048)) - 2048)
        return model.size + extra_ctx * model.kv_bytes_per_token

    def _used_vram(self) -> int:
        return sum(r.size_vram for r in self.runners.values())

    async def schedule(self, model: CatalogueModel, options: Mapping[str, Any], keep_alive: float) -> Runner:
        """Load (or reuse) a runner, evicting as Ollama's scheduler does."""
        runner_opts = {k: v for k, v in options.items() if k in RUNNER_OPTIONS}
        with self.lock:
            self.expire()
            current = self.runners.get(model.name)
            while current is not None and current.loading:
                self.lock.release()
                try:
                    await anyio.sleep(0.01)
                finally:
                    self.lock.acquire()
                current = self.runners.get(model.name)
            if current is not None and current.unloading_until is None:
                if current.options == runner_opts:
                    current.keep_alive = keep_alive
                    current.expires_at = time.monotonic() + keep_alive
                    return current
                self.stats.reloads += 1  # needsReload: options differ
                del self.runners[model.name]
            if model.name in self.oom:
                self.oom.discard(model.name)
                raise OllamaError(
                    500,
                    "llama runner process has terminated: error loading model: unable to allocate CUDA0 buffer: cudaMalloc failed: out of memory",
                )
            size = self._footprint(model, runner_opts)
        while True:
            with self.lock:
                self.expire()
                pending = [r for r in self.runners.values() if r.unloading_until is not None or r.loading]
                active = [r for r in self.runners.values() if r.unloading_until is None]
                fits = self._used_vram() + size <= self.vram
                if not pending and (len(active) < self.max_loaded and (fits or not active)):
                    vram_free = max(0, self.vram - self._used_vram())
                    runner = Runner(
                        model=model, options=runner_opts, keep_alive=keep_alive, expires_at=math.inf,
                        size=size, size_vram=min(size, vram_free), loading=True,
                    )  # fmt: skip
                    self.runners[model.name] = runner
                    break
                if not pending:
                    # victim: shortest keep-alive first, idle before busy
                    victims = sorted(active, key=lambda r: r.keep_alive)
                    victim = next((r for r in victims if r.in_flight == 0), victims[0])
                    self._begin_unload(victim.model.name)
                    self.stats.evictions += 1
            await anyio.sleep(0.01)  # Ollama polls until the VRAM is back
        try:
            if self.load_delay:
                await anyio.sleep(self.load_delay)
        except BaseException:
            with self.lock:
                self.runners.pop(model.name, None)
            raise
        with self.lock:
            runner.loading = False
            runner.expires_at = time.monotonic() + keep_alive
            self.stats.loads += 1
            return runner

    def touch(self, runner: Runner, keep_alive: float) -> None:
        with self.lock:
            runner.keep_alive = keep_alive
            runner.expires_at = time.monotonic() + keep_alive

    def unload(self, name: str) -> None:
        with self.lock:
            if name in self.runners:
                self.runners[name].expires_at = time.monotonic()
                if self.runners[name].in_flight == 0:
                    self._begin_unload(name)

    def ps(self) -> list[dict[str, Any]]:
        self.expire()
        now_mono, now = time.monotonic(), datetime.now(UTC).astimezone()
        out = []
        with self.lock:
            for r in sorted(self.runners.values(), key=lambda r: r.expires_at, reverse=True):
                if r.loading:
                    continue
                left = FOREVER_S if math.isinf(r.expires_at) else r.expires_at - now_mono
                item: dict[str, Any] = {
                    "name": r.model.name,
                    "model": r.model.name,
                    "size": r.size,
                    "digest": r.model.digest,
                    "details": r.model.details(),
                    "expires_at": (now + timedelta(seconds=left)).isoformat(),
                    "size_vram": r.size_vram,
                }
                if self.report_context_length:
                    item["context_length"] = r.num_ctx
                out.append(item)
        return out


class OllamaError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _inputs(data: Mapping[str, Any]) -> list[Any]:
    """``input`` as a list: one string, or a list of them (both endpoints take both)."""
    raw = data.get("input")
    return [raw] if isinstance(raw, str) else list(raw or [])


def _vector(text: Any) -> list[float]:
    """A deterministic 8-dimensional embedding (same text, same vector), L2-normalised as
    Ollama's embeddings are."""
    raw = [int(c, 16) - 7.5 for c in hashlib.sha256(str(text).encode()).hexdigest()[:8]]  # never 0
    norm = math.sqrt(sum(x * x for x in raw))
    return [x / norm for x in raw]


def _reply_words(prompt: str) -> list[str]:
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return ["Echo", " (", digest, "):", *[" " + w for w in prompt.split()[:12]]]


def build_app(state: OllamaState) -> Starlette:
    async def body(request: Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError as exc:
            raise OllamaError(400, f"invalid character in JSON: {exc}") from None
        if not isinstance(data, dict):
            raise OllamaError(400, "json: cannot unmarshal into Go value")
        state.journal.append((request.url.path, data))
        return data

    def gate() -> None:
        state.stats.requests += 1
        state.expire()
        if state.busy > 0:
            state.busy -= 1
            raise OllamaError(503, "server busy, please try again.  maximum pending requests exceeded")

    def find(name: Any) -> CatalogueModel:
        if not isinstance(name, str) or not name:
            raise OllamaError(400, "model is required")
        model = state.model(name)
        if model is None:
            raise OllamaError(404, f"model '{name}' not found")
        return model

    def keep_alive_of(data: Mapping[str, Any]) -> float:
        state.stats.keep_alives.append(data.get("keep_alive"))
        try:
            return parse_keep_alive(data.get("keep_alive"), state.default_keep_alive)
        except KeepAliveError as exc:
            raise OllamaError(400, str(exc)) from None

    async def run(
        model: CatalogueModel, data: Mapping[str, Any], empty: bool, kind: str
    ) -> tuple[Runner | None, str]:
        keep_alive = keep_alive_of(data)
        options = data.get("options") or {}
        if empty and keep_alive == 0:
            state.unload(model.name)
            return None, "unload"
        if kind == "generate" and model.embedding:
            raise OllamaError(400, f'"{model.name}" does not support generate')
        runner = await state.schedule(model, options, keep_alive)
        return runner, "load"

    async def generate(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model"))
        prompt = data.get("prompt") or ""
        runner, reason = await run(model, data, not prompt, "generate")
        if not prompt:
            return JSONResponse(
                {
                    "model": model.name,
                    "created_at": _now(),
                    "response": "",
                    "done": True,
                    "done_reason": reason,
                }
            )
        assert runner is not None
        return answer(runner, data, _reply_words(prompt), chat=False)

    async def chat(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model"))
        messages = data.get("messages") or []
        runner, reason = await run(model, data, not messages, "generate")
        if not messages:
            return JSONResponse({
                "model": model.name, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": reason,
            })  # fmt: skip
        assert runner is not None
        last = str(messages[-1].get("content", "")) if isinstance(messages[-1], dict) else ""
        return answer(runner, data, _reply_words(last), chat=True)

    def answer(runner: Runner, data: Mapping[str, Any], words: list[str], *, chat: bool) -> Response:
        name = runner.model.name

        def chunk(text: str, done: bool) -> dict[str, Any]:
            base: dict[str, Any] = {"model": name, "created_at": _now(), "done": done}
            if chat:
                base["message"] = {"role": "assistant", "content": text}
            else:
                base["response"] = text
            if done:
                base.update(done_reason="stop", total_duration=1000, load_duration=0, prompt_eval_count=len(words),
                            prompt_eval_duration=100, eval_count=len(words), eval_duration=500)  # fmt: skip
                if not chat:
                    base["context"] = list(range(len(words)))
            return base

        if data.get("stream", True) is False:
            final = chunk("".join(words), True)
            state.touch(runner, runner.keep_alive)
            return JSONResponse(final)

        async def stream() -> AsyncIterator[bytes]:
            runner.in_flight += 1
            try:
                for w in words:
                    yield (json.dumps(chunk(w, False)) + "\n").encode()
                    await anyio.lowlevel.checkpoint()
                yield (json.dumps(chunk("", True)) + "\n").encode()
            finally:
                runner.in_flight -= 1
                state.touch(runner, runner.keep_alive)

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def embed(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model"))
        inputs = [i for i in _inputs(data) if i]
        await run(model, data, not inputs, "embed")
        vectors = [_vector(i) for i in inputs]
        return JSONResponse(
            {
                "model": model.name,
                "embeddings": vectors,
                "total_duration": 1000,
                "load_duration": 0,
                "prompt_eval_count": len(inputs),
            }
        )

    async def ps(request: Request) -> Response:
        gate()
        return JSONResponse({"models": state.ps()})

    async def tags(request: Request) -> Response:
        gate()
        return JSONResponse({
            "models": [
                {"name": m.name, "model": m.name, "modified_at": "2026-01-01T00:00:00Z", "size": m.size, "digest": m.digest, "details": m.details()}
                for m in state.catalogue.values()
            ]
        })  # fmt: skip

    async def show(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model") or data.get("name"))
        arch = model.family
        return JSONResponse({
            "modelfile": f"FROM {model.name}\n", "parameters": "stop \"<|eot|>\"", "template": "{{ .Prompt }}",
            "details": model.details(), "modified_at": "2026-01-01T00:00:00Z",
            "model_info": {
                "general.architecture": arch, f"{arch}.context_length": model.context_length,
                f"{arch}.block_count": 32, f"{arch}.embedding_length": 4096,
                f"{arch}.attention.head_count": 32, f"{arch}.attention.head_count_kv": 8,
            },
            "capabilities": ["embedding"] if model.embedding else ["completion"],
        })  # fmt: skip

    async def delete(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model") or data.get("name"))
        state.evict_now(model.name)
        del state.catalogue[model.name]
        return Response(status_code=200)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": state.version})

    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def openai_models(request: Request) -> Response:
        gate()
        return JSONResponse({
            "object": "list",
            "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "library"} for m in state.catalogue.values()],
        })  # fmt: skip

    async def openai_chat(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model"))
        # keep_alive has no effect through /v1 (ollama issues #3645, #9355): default applies
        runner = await state.schedule(model, {}, state.default_keep_alive)
        messages = data.get("messages") or []
        last = str(messages[-1].get("content", "")) if messages and isinstance(messages[-1], dict) else ""
        text = "".join(_reply_words(last))
        created = int(time.time())
        if not data.get("stream"):
            state.touch(runner, runner.keep_alive)
            return JSONResponse({
                "id": "chatcmpl-emulated", "object": "chat.completion", "created": created, "model": model.name,
                "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(last.split()), "completion_tokens": len(text.split()), "total_tokens": len(last.split()) + len(text.split())},
            })  # fmt: skip

        async def sse() -> AsyncIterator[bytes]:
            for word in _reply_words(last):
                piece = {"id": "chatcmpl-emulated", "object": "chat.completion.chunk", "created": created, "model": model.name,
                         "system_fingerprint": "fp_ollama",
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": word}, "finish_reason": None}]}  # fmt: skip
                yield f"data: {json.dumps(piece)}\n\n".encode()
            end = {"id": "chatcmpl-emulated", "object": "chat.completion.chunk", "created": created, "model": model.name,
                   "system_fingerprint": "fp_ollama", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}  # fmt: skip
            yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode()

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def openai_completions(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model"))
        if model.embedding:
            raise OllamaError(400, f'"{model.name}" does not support generate')
        await state.schedule(model, {}, state.default_keep_alive)
        prompt = data.get("prompt") or ""
        text = "".join(_reply_words(str(prompt)))
        return JSONResponse({
            "id": "cmpl-emulated", "object": "text_completion", "created": int(time.time()), "model": model.name,
            "system_fingerprint": "fp_ollama",
            "choices": [{"text": text, "index": 0, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(str(prompt).split()), "completion_tokens": len(text.split()),
                      "total_tokens": len(str(prompt).split()) + len(text.split())},
        })  # fmt: skip

    async def openai_embeddings(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model"))
        inputs = _inputs(data)
        if not inputs:
            raise OllamaError(400, "invalid input")
        await state.schedule(model, {}, state.default_keep_alive)
        return JSONResponse({
            "object": "list", "model": model.name,
            "data": [{"object": "embedding", "embedding": _vector(i), "index": n} for n, i in enumerate(inputs)],
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
        })  # fmt: skip

    def guarded(handler: Any) -> Any:
        async def wrapped(request: Request) -> Response:
            try:
                response: Response = await handler(request)
                return response
            except OllamaError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)

        return wrapped

    routes = [
        Route("/", guarded(root), methods=["GET", "HEAD"]),
        Route("/api/version", guarded(version), methods=["GET"]),
        Route("/api/generate", guarded(generate), methods=["POST"]),
        Route("/api/chat", guarded(chat), methods=["POST"]),
        Route("/api/embed", guarded(embed), methods=["POST"]),
        Route("/api/ps", guarded(ps), methods=["GET"]),
        Route("/api/tags", guarded(tags), methods=["GET"]),
        Route("/api/show", guarded(show), methods=["POST"]),
        Route("/api/delete", guarded(delete), methods=["DELETE"]),
        Route("/v1/models", guarded(openai_models), methods=["GET"]),
        Route("/v1/chat/completions", guarded(openai_chat), methods=["POST"]),
        Route("/v1/completions", guarded(openai_completions), methods=["POST"]),
        Route("/v1/embeddings", guarded(openai_embeddings), methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _catalogue(models: Mapping[str, Any]) -> dict[str, CatalogueModel]:
    out = {}
    for name, spec in models.items():
        if isinstance(spec, CatalogueModel):
            out[name] = spec
        elif isinstance(spec, Mapping):
            fields = dict(spec)
            fields["size"] = parse_size(fields.get("size", "4GB"))
            out[name] = CatalogueModel(name=name, **fields)
        else:
            out[name] = CatalogueModel(name=name, size=parse_size(spec))
    return out


class OllamaEmulator:
    """Runs the emulated server in a background thread; ``url`` is its base URL.

    Fault injection: :meth:`refuse_connections` (the port closes), :meth:`busy`
    (next requests answer 503), :meth:`oom_next` (the next load fails out of memory),
    :meth:`evict` (a model disappears, as if another client or an OOM kill took it).
    """

    def __init__(
        self,
        models: Mapping[str, Any] | None = None,
        *,
        vram: str | int = "24GB",
        max_loaded: int | None = None,
        default_keep_alive: float | None = None,
        load_delay: float = 0.0,
        unload_delay: float = 0.0,
        version: str = "0.5.7",
        report_context_length: bool = True,
        environ: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
    ):
        import os

        env = os.environ if environ is None else environ
        if max_loaded is None:
            max_loaded = int(env.get("OLLAMA_MAX_LOADED_MODELS", "0") or 0) or 3
        if default_keep_alive is None:
            raw = env.get("OLLAMA_KEEP_ALIVE")
            default_keep_alive = parse_keep_alive(
                raw if raw is None or not raw.lstrip("-").isdigit() else float(raw), 300.0
            )
        self.state = OllamaState(
            _catalogue(models or {"llama3.2:3b": "3GB"}),
            vram=parse_size(vram), max_loaded=max_loaded, default_keep_alive=default_keep_alive,
            load_delay=load_delay, unload_delay=unload_delay, version=version,
            report_context_length=report_context_length,
        )  # fmt: skip
        self.app = build_app(self.state)
        self.host = host
        self.port = port or free_port(host)
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stats(self) -> EmulatorStats:
        return self.state.stats

    def start(self) -> OllamaEmulator:
        if self._server is not None:  # idempotent, like stop()
            return self
        self._server = ThreadedServer(self.app, host=self.host, port=self.port, lifespan="off").start(
            timeout=10
        )
        return self

    def serve_forever(self) -> None:
        """Serve in the foreground until SIGINT or SIGTERM (what the command line does)."""
        import uvicorn

        uvicorn.run(self.app, host=self.host, port=self.port, lifespan="off", log_level="warning")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> OllamaEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ------------------------------------------------------------------------

    @contextmanager
    def refuse_connections(self) -> Iterator[None]:
        """Close the port for the duration: clients get 'connection refused'."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def busy(self, requests: int = 1) -> None:
        self.state.busy += requests

    def oom_next(self, model: str) -> None:
        self.state.oom.add(model)

    def evict(self, model: str) -> None:
        self.state.evict_now(model)

    def loaded(self) -> list[str]:
        return [m["name"] for m in self.state.ps()]

    def requests(self, path: str) -> list[dict[str, Any]]:
        """The JSON bodies clients sent to ``path`` (e.g. ``/api/chat``), oldest first."""
        return [data for p, data in self.state.journal if p == path]


def parse_models(text: str) -> dict[str, CatalogueModel]:
    """``"qwen2.5:14b=9GB,nomic-embed-text=300MB"`` → the catalogue; a name with ``embed``
    in it is an embedding model (it refuses /api/generate, as Ollama does)."""
    models = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, size = item.rpartition("=")
        if not sep or not name:
            raise ValueError(f"{item!r} is not NAME=SIZE (e.g. qwen2.5:14b=9GB)")
        try:
            models[name] = CatalogueModel(name=name, size=parse_size(size), embedding="embed" in name)
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
    if not models:
        raise ValueError("name at least one model, e.g. qwen2.5:14b=9GB")
    return models


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def serve(
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port (Ollama's own is 11434).")] = 11434,
    host: Annotated[str, typer.Option("--host", help="Bind address.")] = "127.0.0.1",
    models: Annotated[
        str,
        typer.Option(
            "--models",
            "-m",
            help="The pulled models, NAME=SIZE separated by commas; a name with 'embed' in it is an embedding model.",
        ),
    ] = "llama3.2:3b=3GB",
    vram: Annotated[str, typer.Option("--vram", help="GPU memory the scheduler fits runners into.")] = "24GB",
    load_delay: Annotated[str, typer.Option("--load-delay", help="How long a load takes, e.g. 2s.")] = "0s",
    unload_delay: Annotated[
        str, typer.Option("--unload-delay", help="How long an unloading runner stays in /api/ps.")
    ] = "0s",
    max_loaded: Annotated[
        int | None,
        typer.Option(
            "--max-loaded", min=1, help="Runners at once (default $OLLAMA_MAX_LOADED_MODELS, else 3)."
        ),
    ] = None,
) -> None:
    """An emulated Ollama server for trying modelmora without a GPU: Ollama's protocol
    (native API and /v1), scheduler, keep-alive and VRAM budget, with echoed text and
    deterministic embeddings.  Runs until Ctrl-C or SIGTERM."""
    try:
        catalogue = parse_models(models)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--models") from None
    delays: dict[str, float] = {}
    for flag, value in (("--load-delay", load_delay), ("--unload-delay", unload_delay)):
        try:
            delays[flag] = parse_duration(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=flag) from None
    try:
        budget = parse_size(vram)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--vram") from None
    emulator = OllamaEmulator(
        catalogue, vram=budget, max_loaded=max_loaded, load_delay=delays["--load-delay"],
        unload_delay=delays["--unload-delay"], host=host, port=port,
    )  # fmt: skip
    listing = ", ".join(
        f"{m.name} {format_size(m.size)}" + (" (embedding)" if m.embedding else "")
        for m in catalogue.values()
    )
    print(f"Ollama emulator on {emulator.url}: {format_size(budget)} VRAM; {listing}", flush=True)
    emulator.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """``python -m modelmora.testing.ollama``: the emulator as a server in the foreground."""
    cli(args=argv, prog_name="python -m modelmora.testing.ollama")


__all__ = [
    "CatalogueModel",
    "OllamaEmulator",
    "OllamaState",
    "main",
    "parse_go_duration",
    "parse_keep_alive",
    "parse_models",
]

if __name__ == "__main__":
    main()
