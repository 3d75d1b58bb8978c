"""Leases over HTTP: ``POST /leases {model, holder, reason, ttl}`` holds a model for a
piece of work the way ``async with manager.use(name)`` does in Python, for callers in
another process or language (an agent, a batch job, a UI).

* taking one loads the model if needed and holds one core lease on it: it is never
  evicted, parked or reaped while held, and a load that needs its memory waits or is
  refused, the refusal naming the blocking leases (:meth:`HttpLeases.blocking`);
* it lasts ``ttl`` seconds, at most ``max_ttl`` (a longer one is refused, naming the cap),
  and is extended (a new ``ttl`` from now) or released by its id; an expired one is
  released by the server;
* it is kept across a restart of the server: every change rewrites
  ``<state_dir>/leases.json`` atomically (a temporary file, fsynced, renamed over it,
  under a ``filelock`` so two servers sharing a state dir never interleave), and a server
  that starts takes again each lease of the file that has not expired (loading its model
  in the background); a lease whose model is gone from the registry or fails to load is
  dropped with a warning.

Times: ``expires_at`` is unix seconds (it must survive a restart); ``ttl`` and ``left_s``
seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import filelock

from ..core import Lease, ModelManager
from ..errors import ModelMoraError
from ..spec import format_duration
from .errors import api_error

log = logging.getLogger("modelmora")

FILE = "leases.json"


@dataclasses.dataclass(eq=False)
class HttpLease:
    """One lease over HTTP; ``lease`` is the core lease it holds while granted."""

    id: str
    model: str
    holder: str
    reason: str
    expires_at: float  # unix seconds
    created_at: float  # unix seconds
    lease: Lease | None = dataclasses.field(default=None, repr=False)

    def left(self, now: float) -> float:
        return max(0.0, self.expires_at - now)

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id, "model": self.model, "holder": self.holder, "reason": self.reason,
            "expires_at": self.expires_at, "created_at": self.created_at, "left_s": round(self.left(now), 3),
            "granted": self.lease is not None,
        }  # fmt: skip

    def describe(self, now: float) -> str:
        """``lease-… on qwen by ci-job ('nightly eval', 41m left)``."""
        why = f"{self.reason!r}, " if self.reason else ""
        return (
            f"lease {self.id} on {self.model} by {self.holder} ({why}{format_duration(self.left(now))} left)"
        )


class HttpLeases:
    """The server's leases over HTTP, persisted in ``state_dir``.  ``clock``: unix seconds."""

    def __init__(
        self,
        manager: ModelManager,
        state_dir: Path,
        *,
        max_ttl: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ):
        self.manager = manager
        self.state_dir = state_dir
        self.max_ttl = max_ttl
        self.clock = clock
        self.leases: dict[str, HttpLease] = {}
        self._changed = anyio.Event()

    @property
    def path(self) -> Path:
        return self.state_dir / FILE

    # -- persistence ----------------------------------------------------------------------

    def _save(self) -> None:
        """Write every lease to ``leases.json`` atomically (temporary file, fsync, rename)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        rows = [dataclasses.asdict(dataclasses.replace(lease, lease=None)) for lease in self.leases.values()]
        for row in rows:
            row.pop("lease", None)
        with filelock.FileLock(str(self.path) + ".lock"):
            fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".leases-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump({"version": 1, "leases": rows}, out, indent=1)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def _read(self) -> list[HttpLease]:
        try:
            with filelock.FileLock(str(self.path) + ".lock"):
                data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring the leases in %s: %s", self.path, exc)
            return []
        out = []
        for row in data.get("leases", []) if isinstance(data, dict) else []:
            try:
                out.append(
                    HttpLease(
                        id=str(row["id"]), model=str(row["model"]), holder=str(row["holder"]),
                        reason=str(row.get("reason", "")), expires_at=float(row["expires_at"]),
                        created_at=float(row.get("created_at", 0.0)),
                    )
                )  # fmt: skip
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring a lease of %s: %s", self.path, exc)
        return out

    def restore(self) -> list[HttpLease]:
        """On start: the persisted leases that have not expired, not yet granted (pass them
        to :meth:`grant_restored`); the others are dropped, saying why."""
        now = self.clock()
        restored = []
        for saved in self._read():
            if saved.expires_at <= now:
                log.info("lease %s on %s expired while the server was down", saved.id, saved.model)
            elif saved.model not in self.manager.config.models:
                log.warning("dropping lease %s: %r is no longer in the registry", saved.id, saved.model)
            else:
                self.leases[saved.id] = saved
                restored.append(saved)
        self._save()
        return restored

    async def grant_restored(self, restored: list[HttpLease]) -> None:
        """Take the core lease of each restored lease (loading its model where needed); one
        whose model cannot be loaded is dropped with a warning."""
        for held in restored:
            try:
                await self._grant(held)
            except ModelMoraError as exc:
                log.warning("dropping lease %s on %s: %s", held.id, held.model, exc)
                if self.leases.pop(held.id, None) is not None:
                    self._save()

    # -- taking, extending, releasing ---------------------------------------------------------

    def _ttl(self, ttl: float) -> float:
        if math.isinf(ttl):  # -1, the config's "never": a lease over HTTP always ends
            raise api_error(
                422,
                f"ttl must be a positive duration, not -1 (never): a lease over HTTP always ends; "
                f"give at most {format_duration(self.max_ttl)} and extend it",
                "invalid_ttl",
                param="ttl",
            )
        if not math.isfinite(ttl) or ttl <= 0:
            raise api_error(
                422,
                f"ttl must be a positive duration, got {format_duration(ttl)}",
                "invalid_ttl",
                param="ttl",
            )
        if ttl > self.max_ttl:
            raise api_error(
                422,
                f"ttl {format_duration(ttl)} is longer than this server's lease cap of "
                f"{format_duration(self.max_ttl)}; extend the lease before it ends instead",
                "lease_too_long",
                param="ttl",
            )
        return ttl

    async def _grant(self, held: HttpLease) -> None:
        lease = self.manager.use(held.model)
        await lease.__aenter__()
        if held.id not in self.leases:  # released while its model loaded
            lease.release()
            return
        held.lease = lease
        self._hold(held)
        self._changed.set()

    async def take(self, model: str, holder: str, reason: str, ttl: float) -> HttpLease:
        """A granted lease on ``model`` (loaded if needed).  422 for a ``ttl`` past the cap;
        the core's errors (unknown model, memory refused, timeout) as they are."""
        ttl = self._ttl(ttl)
        now = self.clock()
        held = HttpLease(f"lease-{secrets.token_hex(6)}", model, holder, reason, now + ttl, now)
        self.leases[held.id] = held
        self._save()
        try:
            await self._grant(held)
        except BaseException:
            self.leases.pop(held.id, None)
            self._save()
            raise
        return held

    def get(self, lease_id: str) -> HttpLease:
        held = self.leases.get(lease_id)
        if held is None:
            raise api_error(
                404, f"no lease {lease_id!r} (released, expired, or never taken)", "lease_not_found"
            )
        return held

    def extend(self, lease_id: str, ttl: float) -> HttpLease:
        """The lease now ends ``ttl`` seconds from now (at most the cap)."""
        held = self.get(lease_id)
        held.expires_at = self.clock() + self._ttl(ttl)
        self._hold(held)
        self._save()
        self._changed.set()
        return held

    def _hold(self, held: HttpLease) -> None:
        """Tell the core how long ``held`` is held: a load that cannot wait that long for
        its memory is refused at once, naming it (``HeldByLeases``, a 409)."""
        if held.lease is not None:
            now = self.clock()
            why = f" ({held.reason!r})" if held.reason else ""
            held.lease.hold(f"lease {held.id} on {held.model} by {held.holder}{why}", held.left(now))

    def release(self, lease_id: str) -> HttpLease:
        held = self.get(lease_id)
        self._drop(held)
        return held

    def _drop(self, held: HttpLease) -> None:
        self.leases.pop(held.id, None)
        if held.lease is not None:
            held.lease.release()
            held.lease = None
        self._save()

    def check(self, lease_id: str, model: str) -> HttpLease:
        """The lease an ``X-Modelmora-Lease`` header names: 404 when there is none, 409 when
        it holds another model."""
        held = self.get(lease_id)
        if held.model != model:
            raise api_error(
                409, f"lease {lease_id!r} holds {held.model!r}, not {model!r}", "lease_model_mismatch"
            )
        return held

    def blocking(self, model: str) -> list[HttpLease]:
        """The granted leases on models other than ``model``: what may hold the memory it needs."""
        return [h for h in self.leases.values() if h.model != model and h.lease is not None]

    def named_in(self, model: str) -> str:
        """`` (held by lease …; lease …)`` for a refusal of ``model``, or empty."""
        now = self.clock()
        blocking = self.blocking(model)
        if not blocking:
            return ""
        return " (held by HTTP " + "; ".join(h.describe(now) for h in blocking) + ")"

    # -- expiry ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Release each lease when it expires; runs for the server's lifetime."""
        while True:
            now = self.clock()
            self.expire_due()
            nearest = min((h.expires_at for h in self.leases.values()), default=now + 3600.0)
            self._changed = anyio.Event()
            with anyio.move_on_after(max(0.0, nearest - now)):
                await self._changed.wait()

    def expire_due(self) -> list[HttpLease]:
        """Release the leases whose time is up; returns them."""
        now = self.clock()
        due = [h for h in self.leases.values() if h.expires_at <= now]
        for held in due:
            log.info("lease %s on %s expired", held.id, held.model)
            self._drop(held)
        return due

    def close(self) -> None:
        """Let go of the core leases (the server is stopping); the file keeps them."""
        for held in self.leases.values():
            if held.lease is not None:
                held.lease.release()
                held.lease = None


__all__ = ["FILE", "HttpLease", "HttpLeases"]
