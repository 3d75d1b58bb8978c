"""Ollama: load and unload through its HTTP API, with the memory truth from ``/api/ps``.

* **Load** without generating: ``POST /api/generate`` with no prompt (``/api/embed`` with
  no input for embedding models), ``stream: false``, and exactly the runner options later
  requests will use (Ollama reloads a model whose ``num_ctx`` differs).
* **Dead man's switch**: a model the manager owns is never given ``keep_alive: -1``.  It
  gets a finite keep-alive (what is left of its TTL plus a margin, or ``hold`` while it is
  leased or pinned) that the manager refreshes, so if the manager dies Ollama still frees
  the VRAM on its own timer.  ``pin_forever: true`` allows -1 for pinned models.
* **Unload** = the same empty request with ``keep_alive: 0``; Ollama answers before the
  memory is free, so ``/api/ps`` is polled until the model is gone.
* **Observe** = ``/api/ps``: VRAM share on ``device``, the rest on ``cpu``.
* Errors are mapped in one place (:func:`map_error`); transient ones (connection refused,
  503 busy, timeouts) are retried with exponential back-off and jitter, 404 and other 4xx
  never are.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Mapping
from typing import Any

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
    TransientError,
    UnloadFailed,
)
from ..spec import Duration, Interval, ModelSpec
from .base import Capabilities, Handle, Observed, Provider, ProviderSettings

OOM_MARKERS = (
    "out of memory",
    "cudamalloc failed",
    "failed to allocate",
    "insufficient memory",
    "requires more system memory",
    "model runner has unexpectedly stopped",
    "unable to allocate",
)


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
    if isinstance(exc, httpx.TransportError):
        return ProviderUnavailable(
            f"cannot reach Ollama at {url}: {exc or type(exc).__name__}", model=model, provider=provider
        )
    if isinstance(exc, ModelMoraError):
        return exc
    return ProviderError(f"Ollama at {url}: {type(exc).__name__}: {exc}", model=model, provider=provider)


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
        self._abandoned: dict[str, tuple[ModelSpec, float]] = {}
        self._shown: dict[str, Mapping[str, Any]] = {}

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
        """An estimate where the registry has none (the model's size in ``/api/tags``: its
        weights, a floor for what it will hold), then context optimisation."""
        if not spec.memory:
            size = await self._catalogue_size(spec)
            if size:
                spec = spec.model_copy(update={"memory": {self.settings.device: size}})
        if "kind" not in spec.options and await self._embedding_only(spec):
            # an embedding model refuses /api/generate; it loads through /api/embed
            spec = spec.model_copy(update={"options": {**spec.options, "kind": "embedding"}})
        if not spec.options.get("optimize_context"):
            return spec
        return await self._optimize_context(spec)

    async def _show(self, spec: ModelSpec) -> Mapping[str, Any]:
        """``/api/show`` for a target, asked once: a model's metadata changes only when it is
        pulled again, and prepare() runs before every load."""
        if spec.target not in self._shown:
            response = await self.request("POST", "/api/show", model=spec.name, json={"model": spec.target})
            self._shown[spec.target] = response.json()
        return self._shown[spec.target]

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
        response = await self.request("GET", "/api/tags", model=spec.name)
        wanted = {spec.target, f"{spec.target}:latest"}
        for item in response.json().get("models") or []:
            if item.get("name") in wanted or item.get("model") in wanted:
                return int(item.get("size") or 0) or None
        return None

    async def _optimize_context(self, spec: ModelSpec) -> ModelSpec:
        """The largest ``num_ctx`` within the native context, ``max_context`` and
        ``max_memory``, with the estimate grown by the KV cache that context costs."""
        info: Mapping[str, Any] = (await self._show(spec)).get("model_info") or {}
        arch = str(info.get("general.architecture", ""))
        native = int(info.get(f"{arch}.context_length", 0) or 2048)
        layers = int(info.get(f"{arch}.block_count", 0) or 0)
        embed = int(info.get(f"{arch}.embedding_length", 0) or 0)
        heads = int(info.get(f"{arch}.attention.head_count", 0) or 0)
        kv_heads = int(info.get(f"{arch}.attention.head_count_kv", 0) or heads)
        per_token = int(spec.options.get("kv_bytes_per_token", 0)) or (
            2 * layers * kv_heads * (embed // heads) * 2 if heads else 0  # K and V, f16
        )
        base_ctx = int(spec.options.get("base_context", 2048))
        caps = [native]
        for cap in (spec.options.get("max_context"), self.settings.max_context):
            if cap:
                caps.append(int(cap))
        device = spec.device if spec.device in spec.memory else self.settings.device
        base = spec.memory.get(device, 0)
        limit = spec.options.get("max_memory")
        if limit is not None and per_token:
            room = _size(limit) - base
            caps.append(base_ctx + max(0, room) // per_token)
        num_ctx = max(256, min(caps) // 256 * 256)
        memory = dict(spec.memory)
        memory[device] = base + max(0, num_ctx - base_ctx) * per_token
        options = {**spec.options, "num_ctx": num_ctx}
        return spec.model_copy(update={"options": options, "memory": memory})

    async def load(self, spec: ModelSpec) -> Handle:
        path, body = self._load_body(spec, self.keep_alive_for(spec, spec.keep_alive))
        self._abandoned.pop(spec.target, None)
        try:
            await self.request("POST", path, model=spec.name, json=body, timeout=None)
            seen = await self._find(spec.target)
        except BaseException:
            # a load Ollama may still finish must not stay behind: ask it to let go now, and
            # again whenever observe() still sees it (the request may have been lost, or
            # Ollama may finish loading after this unload)
            self._abandoned[spec.target] = (spec, time.monotonic() + max(60.0, self.settings.hold))
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
        return Handle(
            spec=spec, provider=self.name, endpoint=self.base_url, api="ollama", memory=dict(seen.memory),
            # what requests through this handle should send, so they neither reload the
            # model (options differ) nor disarm the dead man's switch (keep_alive -1)
            request_options=self.runner_options(spec), runtime=path,
            keep_alive=self.keep_alive_for(spec, self.settings.hold),
        )  # fmt: skip

    async def _send_unload(self, spec: ModelSpec) -> None:
        path, body = self._load_body(spec, 0)
        body.pop("options", None)
        await self.request("POST", path, model=spec.name, json=body)

    async def unload(self, handle: Handle) -> dict[str, int]:
        try:
            await self._send_unload(handle.spec)
        except ModelNotFound:
            return {}  # deleted or never there: nothing to free
        except ModelMoraError as exc:
            raise UnloadFailed(
                f"unloading {handle.name!r} from Ollama failed: {exc}", model=handle.name, provider=self.name
            ) from exc
        with anyio.move_on_after(self.settings.unload_timeout):
            while await self._find(handle.target) is not None:  # noqa: ASYNC110 - HTTP has no event to wait on
                await anyio.sleep(self.settings.poll_interval)
            handle.close()
            # a keep-alive refresh already in flight would load it again (an empty generate
            # is a load): for a while, whatever of this name shows up is ours to let go of
            self._abandoned[handle.target] = (handle.spec, time.monotonic() + self.settings.timeout + 5.0)
            return dict(handle.memory)
        raise UnloadFailed(
            f"Ollama at {self.base_url} still lists {handle.target!r} {self.settings.unload_timeout:g}s after unloading it",
            model=handle.name, provider=self.name,
        )  # fmt: skip

    async def observe(self) -> list[Observed]:
        response = await self.request("GET", "/api/ps")
        out = []
        listed = response.json().get("models") or []
        if self._abandoned:
            listed = await self._let_go_of_abandoned(listed)
        for item in listed:
            size, vram = int(item.get("size") or 0), int(item.get("size_vram") or 0)
            memory = {self.settings.device: vram}
            if size > vram:
                memory["cpu"] = size - vram
            out.append(
                Observed(
                    target=str(item.get("name") or item.get("model")),
                    memory=memory,
                    details={
                        k: item[k] for k in ("context_length", "digest", "details", "expires_at") if k in item
                    },
                )
            )
        return out

    async def _let_go_of_abandoned(self, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Unload models this provider gave up on or just unloaded; nobody's to adopt."""
        now = time.monotonic()
        keep = []
        for item in listed:
            name = str(item.get("name") or item.get("model"))
            target = next((t for t in self._abandoned if name in (t, f"{t}:latest")), None)
            if target is None:
                keep.append(item)
                continue
            spec, _ = self._abandoned[target]
            with contextlib.suppress(ModelMoraError):
                await self._send_unload(spec)
        for target, (_, until) in list(self._abandoned.items()):
            if until < now:
                del self._abandoned[target]
        return keep

    async def _find(self, target: str) -> Observed | None:
        for seen in await self.observe():
            if seen.target == target or seen.target == f"{target}:latest":
                return seen
        return None

    async def adopt(self, observed: Observed, spec: ModelSpec) -> Handle:
        return Handle(
            spec=spec, provider=self.name, endpoint=self.base_url, api="ollama",
            memory=dict(observed.memory), owned=False, request_options=self.runner_options(spec),
        )  # fmt: skip

    async def refresh(self, handle: Handle, keep_alive: float) -> None:
        """Re-arm the dead man's switch with the same runner options (no reload)."""
        path, body = self._load_body(handle.spec, self.keep_alive_for(handle.spec, keep_alive))
        await self.request("POST", path, model=handle.name, json=body, timeout=None)


def _size(value: Any) -> int:
    from ..spec import parse_size

    return parse_size(value)


__all__ = ["OllamaProvider", "OllamaSettings", "map_error"]
