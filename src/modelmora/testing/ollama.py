"""An Ollama server on loopback that behaves like the real one, for tests without a GPU.

    with OllamaEmulator(vram="24GiB", models={"mistral-small:22b": "13GB"}) as ollama:
        client = httpx.Client(base_url=ollama.url)

It is a test double, never a runtime: every answer is deterministic text.  What it
reproduces, each with the file and function of the real server (github.com/ollama/ollama)
it follows:

* **Names** (``types/model/name.go`` ``ParseName``/``DisplayShortest``,
  ``server/routes.go`` ``getExistingName``): a name is ``host/namespace/model:tag`` with
  defaults ``registry.ollama.ai``, ``library`` and ``latest``; lookups ignore case;
  ``/api/ps`` and ``/api/tags`` list the shortest display form, always with its tag
  (``nomic-embed-text:latest``); answers to ``/api/generate``, ``/api/chat`` and
  ``/api/embed`` echo the name as the client sent it.
* **Loading and unloading** (``server/routes.go`` ``GenerateHandler``, ``ChatHandler``,
  ``EmbedHandler``): an empty prompt (or empty ``messages``) loads; the same with
  ``keep_alive: 0`` unloads any model, embedding ones included, *before* the capability
  check (``Scheduler.expireRunner``); ``/api/embed`` has no unload shortcut: it schedules
  the model (loading it, or reloading it when the runner options differ) and the
  ``keep_alive: 0`` takes effect when the request ends.  The answer to an unload comes
  before the memory is free: the model stays in ``/api/ps`` for ``unload_delay`` seconds.
* **keep_alive** (``api/types.go`` ``Duration.UnmarshalJSON``, ``envconfig/config.go``
  ``KeepAlive``): numbers are seconds, negative is forever, strings are Go durations, a
  bare ``"300"`` is rejected; omitted (as on ``/v1``) leaves a loaded model's keep-alive
  as it was (``server/sched.go`` ``useLoadedRunner`` only sets it when the request has one).
* **Time in flight** (``server/sched.go`` ``processCompleted``, ``useLoadedRunner``): each
  request holds a reference on its runner for as long as it streams (``token_delay``
  seconds per token); a runner whose keep-alive is 0 unloads when its last request ends;
  an expiry or eviction of a busy runner waits for its requests.
* **Eviction** (``server/sched.go`` ``processPending``, ``load``, ``findRunnerToUnload``,
  ``ByDurationAndName``): ``OLLAMA_MAX_LOADED_MODELS`` (0 = 3 per GPU; a bad value falls
  back to 0 with a warning, ``envconfig.Uint``); with other models loaded, a model whose
  predicted VRAM exceeds 80 % of the free VRAM evicts one (idle runners first, shortest
  keep-alive first, then by name) and the scheduler waits for it to go; the first model
  alone may spill onto the CPU (``size_vram`` < ``size``).
* **Predicted memory** (``llm/llama_server.go`` ``PredictServerVRAM``, ``server/sched.go``
  ``generationBatchSurcharge``): weights + KV cache (2 × layers × KV heads × head size ×
  2 bytes per token of context, × ``OLLAMA_NUM_PARALLEL`` for completion models) + a
  graph surcharge of 768 MiB above 4096 tokens and 2 GiB above 32768 tokens for completion
  models whose ``num_batch`` is automatic.  That is also what ``/api/ps`` reports as
  ``size``.
* **Default context** (``server/routes.go`` ``Serve``, ``usesAutomaticNumCtx``): unless the
  request or the Modelfile sets ``num_ctx`` (or ``OLLAMA_CONTEXT_LENGTH`` is set), 4096
  below 23 GiB of VRAM, 32768 below 47 GiB, 262144 above; capped at the model's trained
  context (``effectiveContext``), which ``/api/ps`` reports as ``context_length``.
* **Reloads** (``server/sched.go`` ``needsReload``, ``api/types.go`` ``Runner``): only the
  runner options (``num_ctx``, ``num_batch``, ``num_gpu``, ``main_gpu``, ``use_mmap``,
  ``num_thread``) are compared, with their defaults filled in; other keys (``low_vram``,
  ``temperature``) never reload.
* **Out of memory** (``server/sched.go`` ``load``, ``evictAllAndWait``,
  ``expireRunnersForRuntimeOOM``; ``llm/status.go``): a load that fails out of memory
  while other models are loaded evicts them all and retries once; an out-of-memory error
  during generation (:meth:`OllamaEmulator.oom_during_generation`) ends that request with
  the error (a final NDJSON ``{"error"}`` line with status 200 when streaming, a 500
  otherwise) and expires every runner.
* ``/api/delete`` deletes the files and leaves a loaded runner running
  (``DeleteHandler``); ``/v1`` errors are ``{"error": {"message", "type", "param",
  "code"}}`` (``openai/openai.go`` ``NewError``); ``/v1/completions`` streams with
  ``stream: true``.

``strict=False`` keeps the emulator's older, simpler model for tests written against it
(exact names, a 2048-token default context with ``size`` = weights + the KV cache above
2048 tokens, a model fits while the VRAM sum stays within 100 %, instant answers).

Not modelled, on purpose:

* the VRAM recovery wait after an unload (``waitForVRAMRecovery``, up to 5 s polling
  NVML): ``unload_delay`` stands for the whole time a model stays listed;
* automatic ``num_batch`` sizing below the surcharge steps, flash attention being off
  (which keeps ``num_batch`` at 512 on CUDA), mmap decisions, several GPUs and
  ``main_gpu`` placement: they change *how much* a load takes, not the rules above;
* the automatic-context OOM retry (``reduceAutoNumCtxForLoadOOM``): injected OOMs are
  retried by evicting, not by shrinking the context;
* ``ollama cp`` aliases sharing one runner (the scheduler keys runners by model file);
* a model still loading is hidden from ``/api/ps`` (the real one may list it with an
  estimated expiry).

From a shell, for trying modelmora by hand (the README's example sessions were made so)::

    python -m modelmora.testing.ollama --port 11499 \
        --models 'qwen2.5:14b=9GB,mistral-small:22b=13GB,nomic-embed-text=300MB' --vram 24GB
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
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

log = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2
FOREVER_S = 292 * 365 * 86400.0  # Go's max duration, as Ollama reports an infinite keep_alive
# api/types.go Runner (json names) and DefaultOptions: the options a runner is started with
RUNNER_DEFAULTS: dict[str, Any] = {
    "num_ctx": None, "num_batch": 512, "num_gpu": -1, "main_gpu": None, "use_mmap": None, "num_thread": 0,
}  # fmt: skip
RUNNER_OPTIONS = frozenset(RUNNER_DEFAULTS)
LOAD_OOM = (
    "llama runner process has terminated: error loading model: unable to allocate CUDA0 buffer: "
    "cudaMalloc failed: out of memory"
)
RUNTIME_OOM = "CUDA error: out of memory"
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
    """Seconds; ``math.inf`` for forever.  ``None`` (omitted) → ``default``."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise KeepAliveError(
            f"json: cannot unmarshal {type(value).__name__} into Go value of type api.Duration"
        )
    seconds = float(value) if not isinstance(value, str) else parse_go_duration(value)
    return math.inf if seconds < 0 else seconds


# -- names (types/model/name.go) ---------------------------------------------------------


@dataclass(frozen=True)
class ModelName:
    """``host/namespace/model:tag``, as Ollama's ``model.ParseName`` splits it."""

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """``ParseName``: the tag after the last ``:`` that follows the last ``/``, then up to
        two ``/``-separated parts before the model; missing parts take Ollama's defaults."""
        s, tag = text, ""
        if s.rfind(":") > s.rfind("/"):
            s, _, tag = s.rpartition(":")
        parts = s.split("/")
        model = parts[-1]
        namespace = parts[-2] if len(parts) >= 2 else ""
        host = "/".join(parts[:-2]) if len(parts) >= 3 else ""
        host = host.split("://", 1)[-1]
        return cls(host or "registry.ollama.ai", namespace or "library", model, tag or "latest")

    def display(self) -> str:
        """``DisplayShortest``: default host and namespace left out, the tag always there."""
        if self.host.lower() != "registry.ollama.ai":
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != "library":
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def fold(self) -> tuple[str, str, str, str]:
        """The identity ``Name.EqualFold`` compares: every part, ignoring case."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())


@dataclass
class CatalogueModel:
    """A model the emulated server has "pulled".  Sizes in bytes.

    ``size`` is the weights (the GGUF file); the architecture fields are what ``/api/show``
    reports in ``model_info`` and what the KV cache is predicted from."""

    name: str
    size: int
    family: str = "llama"
    parameter_size: str = "7B"
    quantization_level: str = "Q4_K_M"
    context_length: int = 8192  # trained context: num_ctx is capped at it
    embedding: bool = False
    block_count: int = 32
    embedding_length: int = 4096
    head_count: int = 32
    head_count_kv: int = 8
    kv_bytes_per_token: int = 0  # 0: from the architecture, as PredictServerVRAM computes it
    modelfile_num_ctx: int | None = None  # PARAMETER num_ctx in the Modelfile
    key: tuple[str, str, str, str] = field(default=("", "", "", ""), repr=False)

    def __post_init__(self) -> None:
        if not self.kv_bytes_per_token:
            head_dim = self.embedding_length // self.head_count if self.head_count else 0
            self.kv_bytes_per_token = 2 * self.block_count * max(1, self.head_count_kv) * head_dim * 2

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def parameter_count(self) -> int:
        """``general.parameter_count``: from ``parameter_size`` ("7B", "137M")."""
        number, unit = self.parameter_size[:-1], self.parameter_size[-1:].upper()
        try:
            return round(float(number) * {"B": 1e9, "M": 1e6, "K": 1e3}.get(unit, 1.0))
        except ValueError:
            return 0

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
    options: dict[str, Any]  # runner options, defaults filled in, num_ctx effective
    keep_alive: float  # seconds (sessionDuration); 0 = unload when the last request ends
    expires_at: float  # monotonic; inf = never
    size: int  # bytes
    size_vram: int  # bytes on the GPU
    ctx_auto: bool = True
    batch_auto: bool = True
    in_flight: int = 0  # refCount: requests holding the runner
    loaded_at: float = field(default_factory=time.monotonic)
    unloading_until: float | None = None  # still listed in /api/ps until then
    loading: bool = False  # VRAM is reserved while the weights load
    evicting: bool = False  # the scheduler waits for this one to go

    @property
    def num_ctx(self) -> int:
        return int(self.options.get("num_ctx") or 2048)


@dataclass
class EmulatorStats:
    loads: int = 0
    unloads: int = 0
    reloads: int = 0
    evictions: int = 0  # runners the scheduler expired to make room (or an OOM expired)
    requests: int = 0
    keep_alives: list[Any] = field(default_factory=list)  # what clients sent, in order


FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
              "Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}  # fmt: skip
"""``general.file_type`` (``gguf.LlamaFileType``) by ``details.quantization_level``."""


def vram_default_context(vram: int, overhead: int = 0) -> int:
    """``server/routes.go`` ``Serve``: the default num_ctx by total VRAM (bytes)."""
    total = max(0, vram - overhead)
    if total >= 47 * GIB:
        return 262144
    if total >= 23 * GIB:
        return 32768
    return 4096


def graph_surcharge(ctx: int) -> int:
    """``server/sched.go`` ``generationBatchForContext`` + ``generationBatchSurcharge``:
    the extra bytes a completion model's automatic batch adds above 4096/32768 tokens."""
    if ctx > 32768:
        return 2 * GIB
    if ctx > 4096:
        return 768 * MIB
    return 0


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
        strict: bool = True,
        token_delay: float = 0.0,
        default_num_ctx: int | None = None,
        num_parallel: int = 1,
    ):
        self.strict = strict
        self.catalogue: dict[str, CatalogueModel] = {}
        for spec in models.values():
            self.add(spec)
        self.vram = vram
        self.max_loaded = max_loaded
        self.default_keep_alive = default_keep_alive
        self.load_delay = load_delay
        self.unload_delay = unload_delay
        self.version = version
        self.report_context_length = report_context_length
        self.token_delay = token_delay
        self.default_num_ctx = default_num_ctx or (vram_default_context(vram) if strict else 2048)
        self.num_parallel = max(1, num_parallel)
        self.runners: dict[str, Runner] = {}
        self.stats = EmulatorStats()
        self.journal: list[tuple[str, dict[str, Any]]] = []  # (path, JSON body) of every request with one
        self.busy = 0  # next N requests answer 503
        self.loads_held = False  # loads do not finish while set (OllamaEmulator.loads_held)
        self.generation_held = False  # no token is generated while set (OllamaEmulator.generation_held)
        self.oom: dict[str, int] = {}  # next N loads of these fail out of memory
        self.oom_generation: set[str] = set()  # the next generation of these fails out of memory
        self.lock = threading.RLock()

    # -- names -------------------------------------------------------------------------

    def add(self, spec: CatalogueModel) -> None:
        """Add to the catalogue under its display name (strict) or its name as given."""
        if self.strict:
            parsed = ModelName.parse(spec.name)
            spec.name, spec.key = parsed.display(), parsed.fold()
        else:
            spec.key = (spec.name, "", "", "")
        self.catalogue[spec.name] = spec

    def model(self, name: str) -> CatalogueModel | None:
        if self.strict:
            wanted = ModelName.parse(name).fold()
            return next((m for m in self.catalogue.values() if m.key == wanted), None)
        if name in self.catalogue:
            return self.catalogue[name]
        if ":" not in name and f"{name}:latest" in self.catalogue:
            return self.catalogue[f"{name}:latest"]
        return None

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

    def _expire_runner(self, r: Runner) -> None:
        """``sessionDuration = 0``: unload now if idle, else when its last request ends."""
        r.keep_alive = 0.0
        r.expires_at = time.monotonic()
        if r.in_flight <= 0 and not r.loading:
            self._begin_unload(r.model.name)

    def evict_now(self, name: str) -> None:
        """Behind the client's back, as an OOM kill or another client's request would."""
        with self.lock:
            model = self.model(name)
            key = model.name if model is not None else name
            if key in self.runners:
                del self.runners[key]
                self.stats.unloads += 1
                self.stats.evictions += 1

    def release(self, runner: Runner) -> None:
        """A request ended (``processCompleted``): the runner goes idle at zero references."""
        with self.lock:
            runner.in_flight -= 1
            if runner.in_flight > 0 or self.runners.get(runner.model.name) is not runner:
                return
            if runner.keep_alive <= 0:
                self._begin_unload(runner.model.name)
            else:
                runner.expires_at = time.monotonic() + runner.keep_alive

    def runtime_oom(self) -> None:
        """``expireRunnersForRuntimeOOM``: every runner expires (busy ones when they finish)."""
        with self.lock:
            for r in list(self.runners.values()):
                if r.unloading_until is None:
                    self._expire_runner(r)
                    self.stats.evictions += 1

    # -- what a load takes -------------------------------------------------------------

    def runner_options(
        self, model: CatalogueModel, options: Mapping[str, Any]
    ) -> tuple[dict[str, Any], bool, bool]:
        """Runner options with defaults filled in (``modelOptions``), num_ctx capped at the
        trained context; and whether num_ctx and num_batch are automatic."""
        opts = dict(RUNNER_DEFAULTS)
        ctx_auto = True
        if model.modelfile_num_ctx:
            opts["num_ctx"], ctx_auto = model.modelfile_num_ctx, False
        for key, value in options.items():
            if key in RUNNER_OPTIONS:
                opts[key] = value
            elif self.strict:
                log.debug("invalid option provided: %s", key)  # FromMap ignores unknown keys
        if "num_ctx" in options:
            ctx_auto = False
        batch_auto = "num_batch" not in options
        ctx = int(opts["num_ctx"] or self.default_num_ctx)
        opts["num_ctx"] = min(ctx, model.context_length) if self.strict else ctx
        return opts, ctx_auto, batch_auto

    def footprint(self, model: CatalogueModel, opts: Mapping[str, Any], batch_auto: bool) -> int:
        """Bytes the runner will take (strict: ``PredictServerVRAM`` + graph surcharge)."""
        ctx = int(opts["num_ctx"])
        if not self.strict:
            return model.size + max(0, ctx - 2048) * model.kv_bytes_per_token
        parallel = 1 if model.embedding else self.num_parallel
        total = model.size + model.kv_bytes_per_token * ctx * parallel
        if not model.embedding and batch_auto:
            total += graph_surcharge(ctx * parallel)
        return total

    def _fits(self, size: int) -> bool:
        used = self._used_vram()
        if self.strict:  # server/sched.go load(): predicted vs 80 % of the free memory
            return size <= max(0, self.vram - used) * 80 // 100
        return used + size <= self.vram

    def _used_vram(self) -> int:
        return sum(r.size_vram for r in self.runners.values())

    @staticmethod
    def needs_reload(runner: Runner, opts: Mapping[str, Any], ctx_auto: bool, batch_auto: bool) -> bool:
        """``needsReload``: runner options only; automatic num_ctx/num_batch on both sides
        match, and a num_gpu below 0 matches anything."""
        new, old = dict(opts), dict(runner.options)
        if runner.ctx_auto and ctx_auto:
            new["num_ctx"] = old["num_ctx"]
        if runner.batch_auto and batch_auto:
            new["num_batch"] = old["num_batch"]
        if int(new.get("num_gpu") or 0) < 0:
            new["num_gpu"] = old["num_gpu"] = -1
        return new != old

    # -- scheduling --------------------------------------------------------------------

    async def schedule(
        self, model: CatalogueModel, options: Mapping[str, Any], keep_alive: float | None
    ) -> Runner:
        """Load (or reuse) a runner as Ollama's scheduler does; the caller holds a reference
        on it until :meth:`release`.  ``keep_alive`` None = omitted (the runner keeps its own)."""
        opts, ctx_auto, batch_auto = self.runner_options(model, options)
        reloading = retried = False
        while True:
            with self.lock:
                self.expire()
                current = self.runners.get(model.name)
                if current is not None and not current.loading and current.unloading_until is None:
                    if not current.evicting and not self.needs_reload(current, opts, ctx_auto, batch_auto):
                        current.in_flight += 1
                        if keep_alive is not None:
                            current.keep_alive = keep_alive
                            current.expires_at = time.monotonic() + keep_alive
                        return current
                    if not current.evicting:
                        if not reloading:
                            self.stats.reloads += 1
                            reloading = True
                        current.evicting = True
                        self._expire_runner(current)
                elif current is None and not self._waiting():
                    runner = self._admit(model, opts, ctx_auto, batch_auto, keep_alive)
                    if runner is not None:
                        oom = self.oom.get(model.name, 0)
                        if oom:
                            self.oom[model.name] = oom - 1
                            del self.runners[model.name]
                            others = [r for r in self.runners.values() if r.unloading_until is None]
                            if not (self.strict and others and not retried):
                                raise OllamaError(500, LOAD_OOM)
                            retried = True  # evictAllAndWait, then retry once
                            for r in others:
                                r.evicting = True
                                self._expire_runner(r)
                                self.stats.evictions += 1
                        else:
                            break
            await anyio.sleep(0.01)  # Ollama waits for the unload (and the VRAM) to finish
        try:
            if self.load_delay:
                await anyio.sleep(self.load_delay)
            while self.loads_held:  # noqa: ASYNC110 - set from the test's thread, not this loop
                await anyio.sleep(0.01)
        except BaseException:
            with self.lock:
                self.runners.pop(model.name, None)
            raise
        with self.lock:
            runner.loading = False
            runner.in_flight += 1
            runner.expires_at = time.monotonic() + runner.keep_alive
            self.stats.loads += 1
            return runner

    def _waiting(self) -> bool:
        """A load or an eviction is under way: the scheduler handles one at a time."""
        return any(r.loading or r.evicting or r.unloading_until is not None for r in self.runners.values())

    def _admit(
        self,
        model: CatalogueModel,
        opts: dict[str, Any],
        ctx_auto: bool,
        batch_auto: bool,
        keep_alive: float | None,
    ) -> Runner | None:
        """A new runner (reserving its VRAM), or None after expiring a victim to make room."""
        size = self.footprint(model, opts, batch_auto)
        loaded = list(self.runners.values())
        if loaded and (len(loaded) >= self.max_loaded or not self._fits(size)):
            victim = self._victim(loaded)
            victim.evicting = True
            self._expire_runner(victim)
            self.stats.evictions += 1
            return None
        vram_free = max(0, self.vram - self._used_vram())
        runner = Runner(
            model=model, options=opts, keep_alive=self.default_keep_alive if keep_alive is None else keep_alive,
            expires_at=math.inf, size=size, size_vram=min(size, vram_free), ctx_auto=ctx_auto,
            batch_auto=batch_auto, loading=True,
        )  # fmt: skip
        self.runners[model.name] = runner
        return runner

    @staticmethod
    def _victim(loaded: list[Runner]) -> Runner:
        """``findRunnerToUnload``: by keep-alive (forever last), then name; idle first."""
        ordered = sorted(loaded, key=lambda r: (r.keep_alive, r.model.name))
        return next((r for r in ordered if r.in_flight == 0), ordered[0])

    def unload(self, name: str) -> None:
        """``expireRunner``: the empty request with ``keep_alive: 0``."""
        with self.lock:
            if name in self.runners and self.runners[name].unloading_until is None:
                self._expire_runner(self.runners[name])

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


class OpenAIError(OllamaError):
    """An error of the ``/v1`` endpoints, answered in OpenAI's shape."""


def _openai_error(exc: OllamaError) -> dict[str, Any]:
    """``openai/openai.go`` ``NewError``."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(exc.status, "api_error")
    return {"error": {"message": exc.message, "type": kind, "param": None, "code": None}}


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


async def _paced(state: OllamaState, words: list[str]) -> AsyncIterator[str]:
    """The reply's words, ``state.token_delay`` seconds apart (a checkpoint when 0); none
    while ``state.generation_held`` (the OpenAI routes held like the native ones)."""
    for w in words:
        while state.generation_held:  # noqa: ASYNC110 - set from the test's thread, not this loop
            await anyio.sleep(0.01)
        await (anyio.sleep(state.token_delay) if state.token_delay else anyio.lowlevel.checkpoint())
        yield w


def _usage(prompt: str, text: str) -> dict[str, int]:
    return {
        "prompt_tokens": len(prompt.split()),
        "completion_tokens": len(text.split()),
        "total_tokens": len(prompt.split()) + len(text.split()),
    }


async def _openai_answer(
    state: OllamaState,
    runner: Runner,
    words: list[str],
    stream: bool,
    whole: Callable[[str], dict[str, Any]],
    piece: Callable[[str | None], dict[str, Any]],
) -> Response:
    """An OpenAI-style answer of ``words``, paced like tokens: ``whole(text)`` as one JSON
    body, or ``piece(word)`` per server-sent event, then ``piece(None)`` (the finish) and
    ``[DONE]``.  The runner is released however the answer ends."""
    if not stream:
        try:
            text = "".join([w async for w in _paced(state, words)])
        finally:
            state.release(runner)
        return JSONResponse(whole(text))

    async def sse() -> AsyncIterator[bytes]:
        try:
            async for word in _paced(state, words):
                yield f"data: {json.dumps(piece(word))}\n\n".encode()
            yield f"data: {json.dumps(piece(None))}\n\ndata: [DONE]\n\n".encode()
        finally:
            state.release(runner)

    return StreamingResponse(sse(), media_type="text/event-stream")


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

    def keep_alive_of(data: Mapping[str, Any]) -> float | None:
        """Seconds, or None when the request has no keep_alive."""
        state.stats.keep_alives.append(data.get("keep_alive"))
        if data.get("keep_alive") is None:
            return None
        try:
            return parse_keep_alive(data.get("keep_alive"), state.default_keep_alive)
        except KeepAliveError as exc:
            raise OllamaError(400, str(exc)) from None

    def shown(data: Mapping[str, Any], model: CatalogueModel) -> str:
        """The name answers carry: the client's own in strict mode (``req.Model``)."""
        return str(data.get("model")) if state.strict else model.name

    async def run(
        model: CatalogueModel, data: Mapping[str, Any], empty: bool, kind: str
    ) -> tuple[Runner | None, str]:
        keep_alive = keep_alive_of(data)
        options = data.get("options") or {}
        if empty and keep_alive == 0 and kind != "embed":
            state.unload(model.name)  # before the capability check, for any model
            return None, "unload"
        if kind != "embed" and model.embedding:
            raise OllamaError(400, f'"{data.get("model")}" does not support {kind}')
        runner = await state.schedule(model, options, keep_alive)
        return runner, "load"

    async def generate(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model"))
        prompt = data.get("prompt") or ""
        runner, reason = await run(model, data, not prompt, "generate")
        if not prompt:
            if runner is not None:
                state.release(runner)
            return JSONResponse({
                "model": shown(data, model), "created_at": _now(), "response": "", "done": True,
                "done_reason": reason,
            })  # fmt: skip
        assert runner is not None
        return await answer(runner, data, _reply_words(prompt), chat=False)

    async def chat(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model"))
        messages = data.get("messages") or []
        runner, reason = await run(model, data, not messages, "chat")
        if not messages:
            if runner is not None:
                state.release(runner)
            return JSONResponse({
                "model": shown(data, model), "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": reason,
            })  # fmt: skip
        assert runner is not None
        last = str(messages[-1].get("content", "")) if isinstance(messages[-1], dict) else ""
        return await answer(runner, data, _reply_words(last), chat=True)

    def oom_now(runner: Runner) -> bool:
        with state.lock:
            if runner.model.name in state.oom_generation:
                state.oom_generation.discard(runner.model.name)
                return True
        return False

    async def answer(runner: Runner, data: Mapping[str, Any], words: list[str], *, chat: bool) -> Response:
        """Tokens every ``token_delay`` seconds while the request holds the runner."""
        name = shown(data, runner.model)
        fails = oom_now(runner)

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

        async def tokens() -> AsyncIterator[str]:
            for n, w in enumerate(words):
                if fails and n == len(words) // 2:
                    state.runtime_oom()
                    raise OllamaError(500, RUNTIME_OOM)
                while state.generation_held:  # noqa: ASYNC110 - set from the test's thread, not this loop
                    await anyio.sleep(0.01)
                if state.token_delay:
                    await anyio.sleep(state.token_delay)
                else:
                    await anyio.lowlevel.checkpoint()
                yield w

        if data.get("stream", True) is False:
            try:
                text = "".join([w async for w in tokens()])
            finally:
                state.release(runner)
            return JSONResponse(chunk(text, True))

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for w in tokens():
                    yield (json.dumps(chunk(w, False)) + "\n").encode()
                yield (json.dumps(chunk("", True)) + "\n").encode()
            except OllamaError as exc:  # mid-stream: a last NDJSON line, the status stays 200
                yield (json.dumps({"error": exc.message}) + "\n").encode()
            finally:
                state.release(runner)

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def embed(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model"))
        inputs = [i for i in _inputs(data) if i]
        runner, _ = await run(model, data, not inputs, "embed")
        assert runner is not None
        try:
            for _ in inputs:
                if state.token_delay:
                    await anyio.sleep(state.token_delay)
            vectors = [_vector(i) for i in inputs]
        finally:
            state.release(runner)
        return JSONResponse({
            "model": shown(data, model), "embeddings": vectors, "total_duration": 1000, "load_duration": 0,
            "prompt_eval_count": len(inputs),
        })  # fmt: skip

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
        parameters = 'stop "<|eot|>"'
        if model.modelfile_num_ctx:
            parameters = f"num_ctx {model.modelfile_num_ctx}\n{parameters}"
        return JSONResponse({
            "modelfile": f"FROM {model.name}\n", "parameters": parameters, "template": "{{ .Prompt }}",
            "details": model.details(), "modified_at": "2026-01-01T00:00:00Z",
            "model_info": {
                "general.architecture": arch, "general.basename": model.name.partition(":")[0],
                "general.file_type": FILE_TYPES.get(model.quantization_level, 0),
                "general.parameter_count": model.parameter_count, "general.quantization_version": 2,
                f"{arch}.context_length": model.context_length,
                f"{arch}.block_count": model.block_count, f"{arch}.embedding_length": model.embedding_length,
                f"{arch}.feed_forward_length": model.embedding_length * 7 // 2,
                f"{arch}.attention.head_count": model.head_count,
                f"{arch}.attention.head_count_kv": model.head_count_kv,
                f"{arch}.attention.layer_norm_rms_epsilon": 1e-05,
                f"{arch}.rope.dimension_count": model.embedding_length // max(1, model.head_count),
                f"{arch}.rope.freq_base": 500000, f"{arch}.vocab_size": 128256,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": None,  # arrays: verbose only
            },
            "license": "", "tensors": None,
            "capabilities": ["embedding"] if model.embedding else ["completion"],
        })  # fmt: skip

    async def delete(request: Request) -> Response:
        gate()
        data = await body(request)
        model = find(data.get("model") or data.get("name"))
        del state.catalogue[model.name]  # the files; a loaded runner keeps running (DeleteHandler)
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

    async def openai_model(request: Request) -> tuple[dict[str, Any], CatalogueModel]:
        """The body and its model.  ``/v1`` requests carry no keep_alive and no runner
        options (``openai/openai.go`` ``FromChatRequest``): a loaded model keeps its
        keep-alive, and one loaded with a non-default ``num_ctx`` is reloaded."""
        data = await body(request)
        try:
            return data, find(data.get("model"))
        except OllamaError as exc:
            raise OpenAIError(exc.status, exc.message) from None

    async def openai_chat(request: Request) -> Response:
        gate()
        data, model = await openai_model(request)
        if model.embedding:
            raise OpenAIError(400, f'"{data.get("model")}" does not support chat')
        messages = data.get("messages") or []
        if not messages:
            raise OpenAIError(400, "[] is too short - 'messages'")
        runner = await state.schedule(model, {}, None)
        last = str(messages[-1].get("content", "")) if isinstance(messages[-1], dict) else ""
        head = {"id": "chatcmpl-emulated", "created": int(time.time()), "model": shown(data, model),
                "system_fingerprint": "fp_ollama"}  # fmt: skip

        def whole(text: str) -> dict[str, Any]:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(last, text)}

        def piece(word: str | None) -> dict[str, Any]:
            delta = {"role": "assistant", "content": word} if word is not None else {}
            choice = {"index": 0, "delta": delta, "finish_reason": None if word is not None else "stop"}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        return await _openai_answer(state, runner, _reply_words(last), bool(data.get("stream")), whole, piece)

    async def openai_completions(request: Request) -> Response:
        """``openai/openai.go`` ``ToCompletion``/``ToCompleteChunk``: ``text_completion`` pieces, then [DONE]."""
        gate()
        data, model = await openai_model(request)
        if model.embedding:
            raise OpenAIError(400, f'"{data.get("model")}" does not support generate')
        runner = await state.schedule(model, {}, None)
        prompt = str(data.get("prompt") or "")
        head = {"id": "cmpl-emulated", "object": "text_completion", "created": int(time.time()),
                "model": shown(data, model), "system_fingerprint": "fp_ollama"}  # fmt: skip

        def whole(text: str) -> dict[str, Any]:
            choice = {"text": text, "index": 0, "finish_reason": "stop"}
            return {**head, "choices": [choice], "usage": _usage(prompt, text)}

        def piece(word: str | None) -> dict[str, Any]:
            choice = {"text": word or "", "index": 0, "finish_reason": None if word is not None else "stop"}
            return {**head, "choices": [choice]}

        return await _openai_answer(
            state, runner, _reply_words(prompt), bool(data.get("stream")), whole, piece
        )

    async def openai_embeddings(request: Request) -> Response:
        gate()
        data, model = await openai_model(request)
        inputs = _inputs(data)
        if not inputs:
            raise OpenAIError(400, "invalid input")
        runner = await state.schedule(model, {}, None)
        state.release(runner)
        return JSONResponse({
            "object": "list", "model": shown(data, model),
            "data": [{"object": "embedding", "embedding": _vector(i), "index": n} for n, i in enumerate(inputs)],
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
        })  # fmt: skip

    def guarded(handler: Any, *, openai: bool = False) -> Any:
        async def wrapped(request: Request) -> Response:
            try:
                response: Response = await handler(request)
                return response
            except OllamaError as exc:
                if openai or isinstance(exc, OpenAIError):
                    return JSONResponse(_openai_error(exc), status_code=exc.status)
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
        Route("/v1/models", guarded(openai_models, openai=True), methods=["GET"]),
        Route("/v1/chat/completions", guarded(openai_chat, openai=True), methods=["POST"]),
        Route("/v1/completions", guarded(openai_completions, openai=True), methods=["POST"]),
        Route("/v1/embeddings", guarded(openai_embeddings, openai=True), methods=["POST"]),
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


def env_uint(environ: Mapping[str, str], key: str, default: int) -> int:
    """``envconfig.Uint``: an unsigned integer; anything else warns and gives ``default``."""
    raw = environ.get(key, "")
    if not raw:
        return default
    if raw.isdigit():
        return int(raw)
    log.warning("invalid environment variable, using default: key=%s value=%r default=%d", key, raw, default)
    return default


def env_keep_alive(raw: str | None) -> float:
    """``envconfig.KeepAlive``: a Go duration or whole seconds; anything else: 5 minutes."""
    if not raw:
        return 300.0
    try:
        seconds = parse_go_duration(raw)
    except KeepAliveError:
        try:
            seconds = float(int(raw))
        except ValueError:
            return 300.0
    return math.inf if seconds < 0 else seconds


class OllamaEmulator:
    """Runs the emulated server in a background thread; ``url`` is its base URL.

    ``vram`` is the GPU's total memory (bytes, or a size such as ``"24GiB"``: a real
    "24 GB" card has 24 GiB); ``gpus`` how many such GPUs the 3-per-GPU default of
    ``OLLAMA_MAX_LOADED_MODELS`` counts; ``token_delay`` seconds per generated token
    (strict default 1 ms); ``load_delay``/``unload_delay`` seconds a load takes and a model
    stays listed after its unload.  ``environ`` stands for the server's environment
    (``OLLAMA_MAX_LOADED_MODELS``, ``OLLAMA_KEEP_ALIVE``, ``OLLAMA_CONTEXT_LENGTH``,
    ``OLLAMA_NUM_PARALLEL``, ``OLLAMA_GPU_OVERHEAD``); default: this process's.

    Fault injection: :meth:`refuse_connections` (the port closes), :meth:`busy`
    (next requests answer 503), :meth:`loads_held` and :meth:`generation_held` (loads
    finish, and requests generate, only when the test lets them), :meth:`oom_next` (the next
    load fails out of memory), :meth:`oom_during_generation` (the next generation fails out
    of memory),
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
        strict: bool = True,
        token_delay: float | None = None,
        gpus: int = 1,
    ):
        import os

        env = os.environ if environ is None else environ
        if max_loaded is None:
            max_loaded = env_uint(env, "OLLAMA_MAX_LOADED_MODELS", 0)
        if max_loaded <= 0:
            max_loaded = 3 * max(gpus, 1)  # server/sched.go defaultModelsPerGPU
        if default_keep_alive is None:
            default_keep_alive = env_keep_alive(env.get("OLLAMA_KEEP_ALIVE"))
        total = parse_size(vram)
        overhead = env_uint(env, "OLLAMA_GPU_OVERHEAD", 0)
        context = env_uint(env, "OLLAMA_CONTEXT_LENGTH", 0)
        self.state = OllamaState(
            _catalogue(models or {"llama3.2:3b": "3GB"}),
            vram=total, max_loaded=max_loaded, default_keep_alive=default_keep_alive,
            load_delay=load_delay, unload_delay=unload_delay, version=version,
            report_context_length=report_context_length, strict=strict,
            token_delay=(0.001 if strict else 0.0) if token_delay is None else token_delay,
            default_num_ctx=context or (vram_default_context(total, overhead) if strict else None),
            num_parallel=env_uint(env, "OLLAMA_NUM_PARALLEL", 1),
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

    @contextmanager
    def loads_held(self) -> Iterator[None]:
        """Loads under way or starting do not finish for the duration (after their
        ``load_delay``): a load that lasts exactly as long as a test needs, however slow
        the machine."""
        self.state.loads_held = True
        try:
            yield
        finally:
            self.state.loads_held = False

    @contextmanager
    def generation_held(self) -> Iterator[None]:
        """Requests generate no token for the duration: they stay in flight (holding their
        runner) for exactly as long as a test needs, however slow the machine."""
        self.state.generation_held = True
        try:
            yield
        finally:
            self.state.generation_held = False

    def oom_next(self, model: str, times: int = 1) -> None:
        """The next ``times`` loads of ``model`` fail out of memory (a retry after evicting
        the other models counts as one)."""
        found = self.state.model(model)
        key = found.name if found is not None else model
        self.state.oom[key] = self.state.oom.get(key, 0) + times

    def oom_during_generation(self, model: str) -> None:
        """The next generation of ``model`` fails out of memory half-way, and every runner
        expires (``expireRunnersForRuntimeOOM``)."""
        found = self.state.model(model)
        self.state.oom_generation.add(found.name if found is not None else model)

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
    "ModelName",
    "OllamaEmulator",
    "OllamaState",
    "main",
    "parse_go_duration",
    "parse_keep_alive",
    "parse_models",
    "vram_default_context",
]

if __name__ == "__main__":
    main()
