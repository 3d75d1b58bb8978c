"""One exception tree for everything modelmora raises.

```
ModelMoraError
├── ConfigError                 bad YAML / dict / environment / CLI input
│   └── ModelFileError          a model file (GGUF, safetensors) that cannot be read
├── UnknownModel                a name that is not in the registry (with a did-you-mean)
├── ModelInUse                  unload refused because leases are held (use force=True)
├── InsufficientMemory          can never fit, or what would have to be evicted is held
├── HandleClosed                a handle used after its model was unloaded
├── ModelMoraTimeout            waiting for memory, a load or an unload took too long
├── Overloaded                  back-pressure: the model's queue is full or too slow (HTTP 429)
├── ManagerClosed               the manager was used outside its ``async with`` block
├── LoadDeferred                a background load gave way (it would have evicted or waited)
└── ProviderError               anything a runtime reported
    ├── ProviderUnavailable     runtime unreachable, not installed, or busy (transient)
    │   ├── RuntimeUnreachable  the one runtime all its models share refuses connections
    │   └── ProviderOutage      its runtime was unreachable a moment ago; asked again after a cool-down
    ├── LoadFailed              the runtime could not load the model
    │   ├── ModelNotFound       the runtime does not have it (e.g. not pulled)
    │   ├── OutOfMemory         the runtime ran out of memory loading it (retried once)
    │   └── RecentlyFailed      a load failed a moment ago; retried after a cool-down
    └── UnloadFailed            the runtime could not unload the model
```

Errors carry the model and provider they are about.  Providers map foreign errors
(httpx, docker, CUDA OOM) at their boundary with ``raise Mapped(...) from exc``.
Errors that are worth retrying also derive from :class:`TransientError`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


class ModelMoraError(Exception):
    """Root of every error modelmora raises."""

    def __init__(self, message: str, *, model: str | None = None, provider: str | None = None):
        super().__init__(message)
        self.message = message
        self.model = model
        self.provider = provider

    def __str__(self) -> str:
        return self.message


class TransientError(ModelMoraError):
    """Marker base: the same call may succeed if retried later."""


class ConfigError(ModelMoraError):
    """Configuration (file, dict, environment or command line) is invalid."""


class ModelFileError(ConfigError):
    """A model file whose header or metadata cannot be read (truncated, corrupt, not the
    format its name says); the message names the file and what is wrong."""


class UnknownModel(ModelMoraError):
    """A model name that the registry does not know."""

    def __init__(self, name: str, known: Iterable[str]):
        self.known = sorted(known)
        close = difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listing = f" (known: {', '.join(self.known)})" if self.known and not close else ""
        super().__init__(f"unknown model {name!r}{hint}{listing}", model=name)
        self.suggestions = close


class ModelInUse(ModelMoraError):
    """Unload refused: the model is leased.  ``force=True`` overrides."""

    def __init__(self, name: str, leases: int):
        super().__init__(
            f"model {name!r} is in use by {leases} lease(s); wait for them or pass force=True",
            model=name,
        )
        self.leases = leases


class InsufficientMemory(ModelMoraError):
    """The model cannot be admitted into the memory budget."""

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        provider: str | None = None,
        device: str | None = None,
        needed: int | None = None,
        available: int | None = None,
        holders: Mapping[str, int] | None = None,
        would_evict: Iterable[str] = (),
    ):
        super().__init__(message, model=model, provider=provider)
        self.device = device
        self.needed = needed
        self.available = available
        self.holders = dict(holders or {})
        self.would_evict = list(would_evict)


class HeldByLeases(InsufficientMemory):
    """Refused at once: the memory it needs is held by leases that say they are held past
    this load's wait bound (``wait_timeout``): a lease over HTTP with its TTL
    (:meth:`modelmora.Lease.hold`).  ``held`` describes each (holder, reason, seconds
    left); ``retry_after``: seconds until the first of them ends."""

    def __init__(self, message: str, *, model: str, held: Iterable[str], retry_after: float):
        super().__init__(message, model=model)
        self.held = list(held)
        self.retry_after = retry_after


class HandleClosed(ModelMoraError):
    """The model behind this handle has been unloaded; take a new lease."""


class ModelMoraTimeout(ModelMoraError, TimeoutError):
    """Waiting for memory, a load or an unload exceeded its timeout."""


class Overloaded(ModelMoraError):
    """Back-pressure: the model's queue is full (``max_queue``), or this request would wait
    past ``scheduling.max_wait`` for one of its ``max_concurrency`` slots.  Refused before
    anything waits; ``retry_after`` (seconds) is when a slot is expected to be free, from
    the model's measured service (and load) times; ``in_flight`` and ``waiting`` count its
    leases held and the requests in line for it."""

    def __init__(self, message: str, *, model: str, retry_after: float, in_flight: int, waiting: int):
        super().__init__(message, model=model)
        self.retry_after = retry_after
        self.in_flight = in_flight
        self.waiting = waiting


class ManagerClosed(ModelMoraError):
    """The manager is not running: use it inside ``async with ModelManager(...)``."""


class LoadDeferred(ModelMoraError):
    """A background load (``load(background=True)``, the baseline model) gave way: it
    would have evicted or parked something, or another load or caller was waiting."""


class ProviderError(ModelMoraError):
    """A runtime reported a failure."""


class ProviderUnavailable(ProviderError, TransientError):
    """The runtime cannot be reached, is not installed, or is busy."""


class RuntimeUnreachable(ProviderUnavailable):
    """The one runtime that serves every model of a provider cannot be reached: Ollama's
    server refuses connections, the Docker engine is down.  It starts an outage (see
    :class:`ProviderOutage`).  A model's own server (a ``process`` or single
    ``llamacpp`` server, a vLLM container) that does not answer is not this: that model
    failed, its provider's other models are fine."""


class ProviderOutage(ProviderUnavailable):
    """A provider's runtime was unreachable a moment ago and is cooling down: its models are
    refused at once (nothing is evicted for them) until ``retry_after`` seconds have passed.
    ``since`` is when the outage began (the manager's clock), ``cause`` its last error."""

    def __init__(
        self,
        message: str,
        *,
        model: str,
        provider: str,
        retry_after: float,
        since: float,
        cause: BaseException,
    ):
        super().__init__(message, model=model, provider=provider)
        self.retry_after = retry_after
        self.since = since
        self.cause = cause


class LoadFailed(ProviderError):
    """The runtime could not load the model."""


class ModelNotFound(LoadFailed):
    """The runtime does not have this model (e.g. it was never pulled)."""


class OutOfMemory(LoadFailed):
    """The runtime ran out of memory while loading the model (CUDA OOM, llama.cpp's failed
    allocation, vLLM's cache blocks, Ollama's "requires more system memory").

    ``device`` is where it loaded, ``needed`` what the failed allocation asked for,
    ``required`` what the runtime says the model needs in all, and ``free`` what was
    free, when known (bytes); ``estimate`` is what the manager had
    reserved on ``device`` for the load (bytes).  The manager raises the model's estimate,
    evicts, and retries once before a caller sees this (:mod:`modelmora.oom`)."""

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        provider: str | None = None,
        device: str | None = None,
        needed: int | None = None,
        free: int | None = None,
        estimate: int | None = None,
        required: int | None = None,
    ):
        super().__init__(message, model=model, provider=provider)
        self.device = device
        self.needed = needed
        self.required = required
        self.free = free
        self.estimate = estimate


class RecentlyFailed(LoadFailed):
    """The model failed to load recently and is cooling down before the next attempt."""

    def __init__(self, message: str, *, model: str, retry_after: float, cause: BaseException):
        super().__init__(message, model=model)
        self.retry_after = retry_after
        self.cause = cause


class UnloadFailed(ProviderError):
    """The runtime could not unload the model."""


__all__ = [
    "ConfigError",
    "HandleClosed",
    "HeldByLeases",
    "InsufficientMemory",
    "LoadDeferred",
    "LoadFailed",
    "ManagerClosed",
    "ModelFileError",
    "ModelInUse",
    "ModelMoraError",
    "ModelMoraTimeout",
    "ModelNotFound",
    "OutOfMemory",
    "Overloaded",
    "ProviderError",
    "ProviderOutage",
    "ProviderUnavailable",
    "RecentlyFailed",
    "RuntimeUnreachable",
    "TransientError",
    "UnknownModel",
    "UnloadFailed",
]
