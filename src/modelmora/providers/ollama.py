"""Ollama: load and unload through its HTTP API, with the memory truth from ``/api/ps``.

Protocol facts are from Ollama's source (github.com/ollama/ollama), file and function named
where they are used.  Units: bytes and seconds.

* **Names**: Ollama resolves ``host/namespace/model:tag`` ignoring case, with defaults
  ``registry.ollama.ai``, ``library`` and ``latest``, and lists ``model:tag``
  (``types/model/name.go``); :meth:`OllamaProvider.target_key` is that identity, and a
  model this provider holds is observed under its registry target.
* **Load** without generating: ``POST /api/generate`` with no prompt (``/api/embed`` with
  no input for embedding models), ``stream: false``, and exactly the runner options later
  requests will use (Ollama reloads a model whose ``num_ctx`` differs) — ``num_ctx``
  always among them, since Ollama's own default depends on the card.
* **Estimate** (``prepare``): the weights (``/api/tags`` size) + the KV cache of that
  context + the graph surcharge, as ``llm/llama_server.go`` ``PredictServerVRAM`` and
  ``server/sched.go`` ``generationBatchSurcharge`` predict them.
* **Dead man's switch**: a model the manager owns is never given ``keep_alive: -1``.  It
  gets a finite keep-alive (what is left of its TTL plus a margin, or ``hold`` while it is
  leased or pinned) that the manager refreshes, so if the manager dies Ollama still frees
  the VRAM on its own timer.  ``pin_forever: true`` allows -1 for pinned models.  A
  refresh is an empty request — a load — so it is never sent for a model Ollama no
  longer lists.
* **Unload** = the empty ``/api/generate`` with ``keep_alive: 0`` for every model (it
  unloads before the capability check; ``/api/embed`` would load or reload first);
  Ollama answers before the memory is free, so ``/api/ps`` is polled until the model is
  gone.
* **Observe** = ``/api/ps``: VRAM share on ``device``, the rest on ``cpu``.  A model this
  provider holds that Ollama no longer lists (its scheduler evicted it — it knows nothing
  of leases —, its timer ran out, a runtime OOM expired every runner) is reported lost.
* Errors are mapped in one place (:func:`map_error`); transient ones (connection refused,
  503 busy, timeouts) are retried with exponential back-off and jitter, 404 and other 4xx
  never are.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from pydantic import Field
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from ..errors import (
    InsufficientMemory,
    LoadFailed,
    ModelMoraError,
    ModelNotFound,
    ProviderError,
    ProviderUnavailable,
    RuntimeUnreachable,
    TransientError,
    UnloadFailed,
)
from ..estimate import Estimate, ollama_estimate, show_kv_per_token
from ..spec import Duration, Interval, ModelSpec
from .base import Capabilities, Handle, Observed, Provider, ProviderSettings
from .ollama_runners import Landed, RunnerLocator, blob_digests

OOM_MARKERS = (
    # llm/status.go outOfMemorySubstrings (compared lower-case, as IsOutOfMemoryMessage does)
    "out of memory",
    "out of device memory",
    "cudamalloc failed",
    "hipmalloc failed",
    "failed to allocate",
    "allocation failed",
    "not enough memory",
    "insufficient memory",
    "vk_error_out_of_device_memory",
    "erroroutofmemory",
    # server/sched.go and llm/server.go: a model too large for RAM, a runner killed by the OOM killer
    "requires more system memory",
    "model runner has unexpectedly stopped",
    "unable to allocate",
)
GIB = 1024**3
MIB = 1024**2

log = logging.getLogger("modelmora")


def ollama_name_key(name: str) -> str:
    """Ollama's identity of a model name: ``types/model/name.go`` ``ParseName`` (defaults
    ``registry.ollama.ai``, ``library``, ``latest``) shown as ``DisplayShortest``, in lower
    case because lookups ignore case (``server/routes.go`` ``getExistingName``)."""
    s, tag = name.strip(), ""
    if s.rfind(":") > s.rfind("/"):
        s, _, tag = s.rpartition(":")
    parts = s.split("/")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else ""
    host = "/".join(parts[:-2]).split("://", 1)[-1] if len(parts) >= 3 else ""
    host, namespace, tag = host or "registry.ollama.ai", namespace or "library", tag or "latest"
    if host.lower() != "registry.ollama.ai":
        shown = f"{host}/{namespace}/{model}:{tag}"
    elif namespace.lower() != "library":
        shown = f"{namespace}/{model}:{tag}"
    else:
        shown = f"{model}:{tag}"
    return shown.lower()


def _default_base_url() -> str:
    host = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434")
    return host if host.startswith("http") else f"http://{host}"


class OllamaSettings(ProviderSettings):
    base_url: str = Field(
        default_factory=_default_base_url, description="Ollama server (default: $OLLAMA_HOST)."
    )
    device: str = Field("cuda:0", description="Device name for the VRAM share (use distinct names per host).")
    timeout: Duration = Field(30.0, description="Timeout of ordinary requests.")
    retries: int = Field(4, ge=1, description="Attempts for transient failures.")
    retry_initial: Interval = Field(0.25, description="First back-off between attempts.")
    retry_max: Interval = Field(8.0, description="Longest back-off between attempts.")
    hold: Duration = Field(
        300.0, description="Keep-alive given while leased/pinned; refreshed by the manager."
    )
    margin: Duration = Field(60.0, description="Added to the remaining TTL in the keep-alive Ollama gets.")
    pin_forever: bool = Field(False, description="Give pinned models keep_alive -1 (no dead man's switch).")
    unload_timeout: Duration = Field(60.0, description="How long to wait for /api/ps to drop a model.")
    poll_interval: Interval = Field(0.1, description="Polling period of /api/ps while unloading.")
    max_context: int | None = Field(None, ge=256, description="Cap for context optimisation.")
    num_ctx: int = Field(
        4096,
        ge=256,
        description="Context sent with every load unless the model sets one (its options or its "
        "Modelfile).  Ollama's own default is 4096 below 23 GiB of VRAM, 32768 below 47 GiB, 262144 "
        "above (or OLLAMA_CONTEXT_LENGTH); /v1 requests send none, so set this to the server's "
        "default if models are also used through /v1, or Ollama reloads them.",
    )
    num_parallel: int = Field(
        1,
        ge=1,
        description="The server's OLLAMA_NUM_PARALLEL: a completion model's KV cache is that many contexts.",
    )
    locate_runners: bool | None = Field(
        None,
        description="Read which GPU(s) Ollama put each runner on (NVML per-process bytes of the "
        "`ollama serve` children) and count its VRAM there instead of on `device`; default: when "
        "base_url is this machine.",
    )


def map_error(
    exc: BaseException | httpx.Response, *, model: str | None, provider: str, url: str
) -> ModelMoraError:
    """Every foreign failure becomes one modelmora error, keeping Ollama's own words."""
    if isinstance(exc, httpx.Response):
        try:
            words = str(exc.json().get("error", "")) or exc.text
        except ValueError:
            words = exc.text
        words = words.strip() or exc.reason_phrase
        status = exc.status_code
        if status == 404:
            target = f"model {model!r}" if model else "the resource"
            return ModelNotFound(
                f"Ollama at {url} does not have {target} ({words}); pull it with `ollama pull {model}`",
                model=model, provider=provider,
            )  # fmt: skip
        if status == 503:
            return ProviderUnavailable(f"Ollama at {url} is busy: {words}", model=model, provider=provider)
        if any(m in words.lower() for m in OOM_MARKERS):
            return InsufficientMemory(
                f"Ollama at {url} ran out of memory loading {model}: {words}", model=model, provider=provider
            )
        return LoadFailed(f"Ollama at {url} answered {status}: {words}", model=model, provider=provider)
    if isinstance(exc, httpx.TimeoutException):
        return ProviderUnavailable(
            f"Ollama at {url} timed out ({type(exc).__name__})", model=model, provider=provider
        )
    if isinstance(exc, httpx.TransportError):  # refused, reset, DNS: the one server is down
        return RuntimeUnreachable(
            f"cannot reach Ollama at {url}: {exc or type(exc).__name__}", model=model, provider=provider
        )
    if isinstance(exc, ModelMoraError):
        return exc
    return ProviderError(f"Ollama at {url}: {type(exc).__name__}: {exc}", model=model, provider=provider)


NEVER_AFTER_S = 100 * 365 * 86400.0  # further off than this: an infinite keep_alive (Go's max duration)


def expires_at(value: Any) -> float | None:
    """``/api/ps``'s ``expires_at`` (RFC 3339, Go's nanoseconds) as unix seconds; None when
    absent, unreadable, Go's zero time, or so far off it means "never" (``keep_alive: -1``)."""
    if not isinstance(value, str) or not value:
        return None
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.strip()).replace("Z", "+00:00").replace("z", "+00:00")
    try:
        when = datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        return None
    if when <= 0 or when - time.time() > NEVER_AFTER_S:
        return None
    return when


class OllamaProvider(Provider):
    """One instance per Ollama server; configure several for several hosts."""

    Settings = OllamaSettings
    settings: OllamaSettings
    capabilities = Capabilities(refresh=True)

    def __init__(self, name: str = "ollama", settings: OllamaSettings | None = None):
        super().__init__(name, settings)
        self.base_url = self.settings.base_url.rstrip("/")
        self._client: httpx.AsyncClient | None = None
        # targets of failed loads Ollama may still finish, and of unloads a late refresh may
        # undo: unloaded when observe() next sees them, until their deadline
        self._abandoned: dict[str, tuple[ModelSpec, float]] = {}  # by target_key
        self._shown: dict[str, Mapping[str, Any]] = {}
        self._sizes: dict[str, int] = {}  # weights in bytes from /api/tags, by target_key
        self._listed: tuple[float, frozenset[str]] = (
            -math.inf,
            frozenset(),
        )  # last /api/ps: when, which keys
        # models this provider loaded or adopted and has not unloaded, by target_key: the
        # ones reported lost when Ollama no longer lists them
        self._held: dict[str, Handle] = {}
        self._unloading: set[str] = set()  # keys whose leaving /api/ps is an unload, not a loss
        self._late: set[str] = set()  # keys whose unload timed out: Ollama may still carry it out
        # the target each model was configured as, by target_key: what observe() reports
        # it under (Ollama lists its own spelling), held or not
        self._targets: dict[str, str] = {}
        # where Ollama put the runners of the models held (ollama_runners.py), by target_key;
        # the locator is None for an Ollama elsewhere (or locate_runners: false)
        local = urlsplit(self.base_url).hostname in ("localhost", "127.0.0.1", "::1", "0.0.0.0")
        wanted = self.settings.locate_runners
        self.locator: RunnerLocator | None = (
            RunnerLocator() if (local if wanted is None else wanted) else None
        )
        self._landed: dict[str, Landed] = {}

    def target_key(self, target: str) -> str:
        """``nomic-embed-text`` and ``registry.ollama.ai/library/Nomic-Embed-Text:latest``
        are one model to Ollama: both are ``nomic-embed-text:latest``."""
        return ollama_name_key(target)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.base_url, timeout=self.settings.timeout)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- HTTP with retries ---------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        model: str | None = None,
        json: Any = None,
        timeout: float | None = -1.0,
    ) -> httpx.Response:
        """One logical request: transient failures retried, every failure mapped."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(self.settings.retries),
            wait=wait_exponential(multiplier=self.settings.retry_initial, max=self.settings.retry_max)
            + wait_random(0, self.settings.retry_initial),
            reraise=True,
        )
        extra: dict[str, Any] = {} if timeout == -1.0 else {"timeout": timeout}
        async for attempt in retrying:
            with attempt:
                try:
                    response = await self.client.request(method, path, json=json, **extra)
                except (httpx.HTTPError, OSError) as exc:
                    raise map_error(exc, model=model, provider=self.name, url=self.base_url) from exc
                if response.status_code >= 400:
                    raise map_error(response, model=model, provider=self.name, url=self.base_url)
                return response
        raise AssertionError("unreachable")  # pragma: no cover

    # -- what a load sends ---------------------------------------------------------------

    @staticmethod
    def runner_options(spec: ModelSpec) -> dict[str, Any]:
        """The runner options a model is loaded with, and that later requests must repeat."""
        opts = dict(spec.options.get("options", {}))
        for key in ("num_ctx", "num_gpu", "num_batch", "num_thread", "main_gpu", "low_vram", "use_mmap"):
            if key in spec.options:
                opts[key] = spec.options[key]
        return opts

    def keep_alive_for(self, spec: ModelSpec, remaining: float | None) -> float | int:
        """Finite unless pinned with ``pin_forever``: the dead man's switch."""
        if spec.pinned and self.settings.pin_forever:
            return -1
        if remaining is None or math.isinf(remaining):
            remaining = self.settings.hold
        return round(remaining + self.settings.margin, 3)

    def _load_body(self, spec: ModelSpec, keep_alive: float | int) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": spec.target, "keep_alive": keep_alive}
        opts = self.runner_options(spec)
        if opts:
            body["options"] = opts
        if spec.options.get("kind") == "embedding":
            return "/api/embed", {**body, "input": ""}
        return "/api/generate", {**body, "stream": False}

    # -- provider ------------------------------------------------------------------------

    async def prepare(self, spec: ModelSpec) -> ModelSpec:
        """The context Ollama will run the model with, sent explicitly (``num_ctx``), and an
        estimate of what that takes: the weights (``/api/tags`` size) + that context's KV
        cache + the graph surcharge — never below the registry's own estimate."""
        if "kind" not in spec.options and await self._embedding_only(spec):
            # an embedding model refuses /api/generate; it loads through /api/embed
            spec = spec.model_copy(update={"options": {**spec.options, "kind": "embedding"}})
        if spec.options.get("optimize_context"):
            return await self._optimize_context(spec)
        spec = await self._with_context(spec)
        weights = await self._catalogue_size(spec)
        return await self._with_estimate(spec, weights, int(self.runner_options(spec)["num_ctx"]))

    async def _show(self, spec: ModelSpec) -> Mapping[str, Any]:
        """``/api/show`` for a target, asked once: a model's metadata changes only when it is
        pulled again, and prepare() runs before every load."""
        key = self.target_key(spec.target)
        if key not in self._shown:
            response = await self.request("POST", "/api/show", model=spec.name, json={"model": spec.target})
            self._shown[key] = response.json()
        return self._shown[key]

    async def serves(self, spec: ModelSpec) -> frozenset[str] | None:
        """Embedding models answer ``/v1/embeddings`` only (told by ``options.kind`` or found
        in ``/api/show``); others: whatever Ollama answers."""
        kind = spec.options.get("kind")
        embedding = kind == "embedding" if kind is not None else await self._embedding_only(spec)
        return frozenset({"embeddings"}) if embedding else None

    async def _embedding_only(self, spec: ModelSpec) -> bool:
        """From ``/api/show`` capabilities (servers before 0.6 have none: assume a generator)."""
        caps = (await self._show(spec)).get("capabilities") or []
        return "embedding" in caps and "completion" not in caps

    async def _catalogue_size(self, spec: ModelSpec) -> int | None:
        """The model's weights in bytes: its size in ``/api/tags`` (asked once per model,
        like ``/api/show``: it changes only when the model is pulled again)."""
        wanted = self.target_key(spec.target)
        if wanted not in self._sizes:
            response = await self.request("GET", "/api/tags", model=spec.name)
            for item in response.json().get("models") or []:
                size = int(item.get("size") or 0)
                if size:
                    self._sizes[self.target_key(str(item.get("name") or item.get("model") or ""))] = size
        return self._sizes.get(wanted)

    async def _architecture(self, spec: ModelSpec) -> tuple[int, int]:
        """(trained context in tokens, KV-cache bytes per token of context) from
        ``/api/show``, by the one KV formula of :func:`modelmora.estimate.show_kv_per_token`
        (f16: 2 × layers × KV heads × head size × 2 bytes, as ``PredictServerVRAM``
        computes it); ``kv_bytes_per_token`` in the options wins."""
        info: Mapping[str, Any] = (await self._show(spec)).get("model_info") or {}
        arch = str(info.get("general.architecture", ""))
        native = int(info.get(f"{arch}.context_length", 0) or 0)
        per_token = int(spec.options.get("kv_bytes_per_token", 0)) or show_kv_per_token(info)
        return native, per_token

    async def _with_context(self, spec: ModelSpec) -> ModelSpec:
        """``num_ctx`` made explicit: the model's own, else its Modelfile's (what Ollama
        would use), else ``settings.num_ctx`` — never left to Ollama's VRAM-tier default."""
        if "num_ctx" in self.runner_options(spec):
            return spec
        num_ctx = self.settings.num_ctx
        for line in str((await self._show(spec)).get("parameters") or "").splitlines():
            key, _, value = line.strip().partition(" ")
            if key == "num_ctx" and value.strip().isdigit():
                num_ctx = int(value.strip())
        return spec.model_copy(update={"options": {**spec.options, "num_ctx": num_ctx}})

    async def estimate(self, spec: ModelSpec, weights: int, num_ctx: int) -> Estimate:
        """What Ollama will hold for ``spec`` with ``num_ctx`` tokens of context
        (:func:`modelmora.estimate.ollama_estimate`), on the device its VRAM share counts on."""
        _, per_token = await self._architecture(spec)
        return self._estimate(spec, weights, num_ctx, per_token)

    def _estimate(self, spec: ModelSpec, weights: int, num_ctx: int, per_token: int) -> Estimate:
        """The one formula, with ``/api/show`` already asked (``_architecture``)."""
        return ollama_estimate(
            self._shown.get(self.target_key(spec.target)) or {}, weights=weights, num_ctx=num_ctx,
            parallel=self.settings.num_parallel, embedding=spec.options.get("kind") == "embedding",
            auto_batch="num_batch" not in self.runner_options(spec),
            device=spec.device if spec.device in spec.memory else self.settings.device, kv_per_token=per_token,
            source=f"{self.base_url}/api/show {spec.target}",
        )  # fmt: skip

    async def _with_estimate(self, spec: ModelSpec, weights: int | None, num_ctx: int) -> ModelSpec:
        """The device estimate raised to the prediction (a split the registry gives across
        several devices is its own business and left alone)."""
        device = spec.device if spec.device in spec.memory else self.settings.device
        if set(spec.memory) - {device}:
            return spec
        base = weights or spec.memory.get(device, 0)
        if not base:
            return spec
        estimate = await self.estimate(spec, base, num_ctx)
        self.estimates[spec.name] = estimate
        memory = {device: max(spec.memory.get(device, 0), estimate.total)}
        return spec.model_copy(update={"memory": memory})

    async def _optimize_context(self, spec: ModelSpec) -> ModelSpec:
        """The largest ``num_ctx`` (a multiple of 256) within the native context,
        ``max_context`` and a prediction within ``max_memory``; the estimate is that
        prediction."""
        native, per_token = await self._architecture(spec)
        device = spec.device if spec.device in spec.memory else self.settings.device
        weights = await self._catalogue_size(spec) or spec.memory.get(device, 0)
        caps = [native or 2048]
        for cap in (spec.options.get("max_context"), self.settings.max_context):
            if cap:
                caps.append(int(cap))
        limit = spec.options.get("max_memory")
        if limit is not None and per_token:
            room = _size(limit) - weights
            parallel = 1 if spec.options.get("kind") == "embedding" else self.settings.num_parallel
            fits = 0
            # the surcharge steps at 4096 and 32768 tokens: the best context below each step
            for ceiling, surcharge in ((4096, 0), (32768, 768 * MIB), (None, 2 * GIB)):
                extra = 0 if spec.options.get("kind") == "embedding" else surcharge
                tokens = max(0, room - extra) // (per_token * parallel)
                if ceiling is not None:
                    tokens = min(tokens, ceiling // parallel)
                fits = max(fits, tokens)
            caps.append(fits)
        num_ctx = max(256, min(caps) // 256 * 256)
        spec = spec.model_copy(update={"options": {**spec.options, "num_ctx": num_ctx}})
        if weights:
            estimate = self._estimate(spec, weights, num_ctx, per_token)
            self.estimates[spec.name] = estimate
            spec = spec.model_copy(update={"memory": {**spec.memory, device: estimate.total}})
        return spec

    async def load(self, spec: ModelSpec) -> Handle:
        spec = await self._with_context(spec)
        path, body = self._load_body(spec, self.keep_alive_for(spec, spec.keep_alive))
        key = self.target_key(spec.target)
        self._abandoned.pop(key, None)
        self._targets[key] = spec.target
        locator = self.locator
        before = await self._runners(locator)
        try:
            await self.request("POST", path, model=spec.name, json=body, timeout=None)
            seen = await self._find(spec.target)
        except BaseException:
            # a load Ollama may still finish must not stay behind: ask it to let go now, and
            # again whenever observe() still sees it (the request may have been lost, or
            # Ollama may finish loading after this unload)
            self._abandoned[key] = (spec, time.monotonic() + max(60.0, self.settings.hold))
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self.settings.timeout),
                contextlib.suppress(ModelMoraError),
            ):
                await self._send_unload(spec)
            raise
        if seen is None:
            raise LoadFailed(
                f"Ollama at {self.base_url} accepted {spec.target!r} but does not list it as loaded",
                model=spec.name,
                provider=self.name,
            )
        memory, placement = dict(seen.memory), ""
        if locator is not None:
            landed = await self._locate(spec, locator, before)
            if landed is not None:
                self._landed[key] = landed
                memory, placement = self._on_landed(seen.memory, landed), landed.describe()
        handle = Handle(
            spec=spec, provider=self.name, endpoint=self.base_url, api="ollama", memory=memory,
            placement=placement,
            # what requests through this handle should send, so they neither reload the
            # model (options differ) nor disarm the dead man's switch (keep_alive -1)
            request_options=self.runner_options(spec), runtime=path,
            keep_alive=self.keep_alive_for(spec, self.settings.hold),
        )  # fmt: skip
        self._held[key] = handle
        return handle

    async def _send_unload(self, spec: ModelSpec) -> None:
        """``server/routes.go`` ``GenerateHandler``: an empty prompt with ``keep_alive: 0``
        expires the runner before any capability check, for embedding models too, and
        loads nothing; ``/api/embed`` would schedule the model first (a load if it is not
        loaded, a reload if the options differ)."""
        await self.request(
            "POST", "/api/generate", model=spec.name, json={"model": spec.target, "keep_alive": 0}
        )

    async def unload(self, handle: Handle) -> dict[str, int]:
        key = self.target_key(handle.target)
        self._unloading.add(key)  # leaving /api/ps now is this unload, not a loss
        try:
            return await self._unload(handle, key)
        finally:
            self._unloading.discard(key)

    async def _unload(self, handle: Handle, key: str) -> dict[str, int]:
        try:
            await self._send_unload(handle.spec)
        except ModelNotFound:
            self._forget(handle, key)
            return {}  # deleted or never there: nothing to free
        except ModelMoraError as exc:
            raise UnloadFailed(
                f"unloading {handle.name!r} from Ollama failed: {exc}", model=handle.name, provider=self.name
            ) from exc
        # Ollama unloads a model with requests in flight when the last one ends
        # (server/sched.go processCompleted): the wait below includes them
        with anyio.move_on_after(self.settings.unload_timeout):
            while await self._find(handle.target) is not None:  # noqa: ASYNC110 - HTTP has no event to wait on
                await anyio.sleep(self.settings.poll_interval)
            self._forget(handle, key)
            handle.close()
            # a keep-alive refresh already in flight would load it again (an empty generate
            # is a load): for a while, whatever of this name shows up is ours to let go of
            self._abandoned[key] = (handle.spec, time.monotonic() + self.settings.timeout + 5.0)
            return dict(handle.memory)
        self._late.add(key)
        raise UnloadFailed(
            f"Ollama at {self.base_url} still lists {handle.target!r} {self.settings.unload_timeout:g}s after "
            "unloading it (it unloads when its last request ends)",
            model=handle.name, provider=self.name,
        )  # fmt: skip

    def _forget(self, handle: Handle, key: str) -> None:
        self._late.discard(key)
        if self._held.get(key) is handle:
            del self._held[key]
            self._landed.pop(key, None)

    async def _runners(self, locator: RunnerLocator | None) -> set[int]:
        """The runner pids before a load (a reading, never a reason to fail it)."""
        if locator is None:
            return set()
        try:
            return set(await anyio.to_thread.run_sync(locator.runners))
        except Exception as exc:
            log.warning("could not list Ollama's runners: %s", exc)
            return set()

    async def _locate(self, spec: ModelSpec, locator: RunnerLocator, before: set[int]) -> Landed | None:
        """Where Ollama put ``spec``'s runner (:mod:`.ollama_runners`); None when that cannot
        be read (no NVML, no runner found), and the VRAM stays counted on ``device``."""
        try:
            blobs = blob_digests(await self._show(spec))
        except ModelMoraError:
            blobs = frozenset()
        try:
            return await anyio.to_thread.run_sync(locator.locate, before, blobs)
        except Exception as exc:  # a reading, never a reason to fail the load
            log.warning("could not read where Ollama put %s's runner: %s", spec.name, exc)
            return None

    def _on_landed(self, memory: Mapping[str, int], landed: Landed) -> dict[str, int]:
        """``/api/ps``'s VRAM share (on ``device``) moved to the GPUs the runner landed on."""
        vram = memory.get(self.settings.device, 0)
        placed = landed.split(vram)
        if not placed:
            return dict(memory)
        rest = {d: n for d, n in memory.items() if d != self.settings.device}
        return {**placed, **rest}

    async def observe(self) -> list[Observed]:
        response = await self.request("GET", "/api/ps")
        out = []
        listed = response.json().get("models") or []
        if self._abandoned:
            listed = await self._let_go_of_abandoned(listed)
        present: set[str] = set()
        for item in listed:
            name = str(item.get("name") or item.get("model"))
            key = self.target_key(name)
            present.add(key)
            size, vram = int(item.get("size") or 0), int(item.get("size_vram") or 0)
            memory = {self.settings.device: vram}
            if size > vram:
                memory["cpu"] = size - vram
            if key in self._landed and key in self._held:
                memory = self._on_landed(memory, self._landed[key])
            out.append(
                Observed(
                    # under the target it was loaded as: Ollama lists its own spelling
                    target=self._targets.get(key, name),
                    memory=memory,
                    details={
                        k: item[k] for k in ("context_length", "digest", "details", "expires_at") if k in item
                    },
                    expires_at=expires_at(item.get("expires_at")),
                )
            )
        for key, handle in list(self._held.items()):
            if key not in present and key not in self._unloading:
                del self._held[key]
                self._landed.pop(key, None)
                if key in self._late:
                    why = "the unload that timed out took effect (Ollama waited for its last request)"
                else:
                    why = (
                        "its scheduler evicted it (a new model must fit in 80 % of the free VRAM, and "
                        "Ollama knows nothing of leases), its keep-alive ran out, or an out-of-memory "
                        "error expired every model"
                    )
                self._late.discard(key)
                self.report_lost(handle, f"Ollama no longer lists {handle.target!r} in /api/ps: {why}")
        return out

    async def _let_go_of_abandoned(self, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Unload models this provider gave up on or just unloaded; nobody's to adopt."""
        now = time.monotonic()
        keep = []
        for item in listed:
            key = self.target_key(str(item.get("name") or item.get("model")))
            if key not in self._abandoned:
                keep.append(item)
                continue
            spec, _ = self._abandoned[key]
            with contextlib.suppress(ModelMoraError):
                await self._send_unload(spec)
        for key, (_, until) in list(self._abandoned.items()):
            if until < now:
                del self._abandoned[key]
        return keep

    async def _find(self, target: str) -> Observed | None:
        key = self.target_key(target)
        for seen in await self.observe():
            if self.target_key(seen.target) == key:
                return seen
        return None

    async def adopt(self, observed: Observed, spec: ModelSpec) -> Handle:
        handle = Handle(
            spec=spec, provider=self.name, endpoint=self.base_url, api="ollama",
            memory=dict(observed.memory), owned=False, request_options=self.runner_options(spec),
        )  # fmt: skip
        key = self.target_key(spec.target)
        self._held.setdefault(key, handle)
        self._targets.setdefault(key, spec.target)
        return handle

    async def refresh(self, handle: Handle, keep_alive: float) -> None:
        """Re-arm the dead man's switch with the same runner options (no reload) — only
        while Ollama still lists the model: the refresh is an empty request, which would
        load an evicted model again (and evict another to make room)."""
        key = self.target_key(handle.target)
        if await self._find(handle.target) is None:
            return  # observe() has reported it lost
        if handle.closed or key in self._unloading or key in self._abandoned:
            return  # an unload began meanwhile: this empty request would load it again
        path, body = self._load_body(handle.spec, self.keep_alive_for(handle.spec, keep_alive))
        await self.request("POST", path, model=handle.name, json=body, timeout=None)


def _size(value: Any) -> int:
    from ..spec import parse_size

    return parse_size(value)


__all__ = ["OllamaProvider", "OllamaSettings", "map_error"]
