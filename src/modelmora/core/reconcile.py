"""Runtime truth: bring the table in line with what each provider reports.

Models that vanished from their runtime leave the table (with a ``Vanished`` event);
models resident but unknown are adopted (not owned: never reaped on a timer); measured
sizes replace estimates, and the runtime's own expiry (``Observed.expires_at``) is kept on
the entry for ``status()``.  Names are compared by ``Provider.target_key``, so a runtime that
lists ``nomic-embed-text`` as ``nomic-embed-text:latest`` is talking about the same model.

Observations take time, and the table moves meanwhile.  An answer is applied only to
entries whose ``generation`` did not change since it was requested, and models are
adopted only when none of the provider's entries moved meanwhile, so a stale answer can
neither drop a model that just loaded nor adopt one that was just unloaded.  A provider
that fails to answer is reported (``status().problems``) and skipped; reconciliation
never raises.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import anyio

from .. import events as ev
from ..footprint import Footprint
from ..providers.base import Observed, Provider, Tier
from ..spec import ModelSpec
from .context import Core, unreachable
from .lifecycle import STABLE, Action, Entry, State
from .outcome import Attempt
from .transitions import Transitions

log = logging.getLogger("modelmora")


class Reconciler:
    def __init__(self, core: Core, transitions: Transitions):
        self.core = core
        self.transitions = transitions

    async def run(self, *, wait_for_adoptions: bool = False) -> None:
        """Reconcile every provider; ``wait_for_adoptions``: return once the models found
        are adopted, except where adopting may take long (``Capabilities.slow_adopt``)."""
        for name, provider in list(self.core.providers.items()):
            adopted = await self.provider(name, provider)
            if wait_for_adoptions and not provider.capabilities.slow_adopt:
                for entry in adopted:
                    await entry.attempt.wait()
        self.core.monitor.note_usage(self.core.usage())

    async def provider(self, name: str, provider: Provider) -> list[Entry]:
        core = self.core
        stamps = {e: e.generation for e in core.table.of_provider(name)}
        moves = core.lifecycle.moves.get(name, 0)
        try:
            observed = await provider.observe()
        except Exception as exc:
            core.problem(f"observe:{name}", exc)
            if unreachable(exc):
                core.provider_down(name, exc)
            return []
        core.recovered(f"observe:{name}")
        core.provider_up(name)
        moved = core.lifecycle.moves.get(name, 0) != moves  # while we waited for the answer
        by_key = {provider.target_key(o.target): o for o in observed}
        for entry, generation in stamps.items():
            if entry.generation != generation or entry.state not in STABLE:
                continue  # it moved while we asked: the answer may predate the move
            seen = by_key.get(provider.target_key(entry.spec.target))  # asked now: names may move
            if seen is None:
                self.transitions.vanish(entry, "the runtime no longer reports it")
            else:
                self._apply(entry, seen)
        if moved or core.closing:
            return []  # adopt from a fresh answer next time; nothing new once shutting down
        known = {provider.target_key(e.spec.target) for e in core.table.of_provider(name)}
        adopted = []
        for key, seen in by_key.items():
            if key in known:
                continue
            spec = self._spec_for(name, seen, key)
            if spec.name in core.table:
                continue
            adopted.append(self._adopt(provider, spec, key, seen))
        return adopted

    def _apply(self, entry: Entry, seen: Observed) -> None:
        entry.runtime_expires_at = seen.expires_at  # not state nor memory: what status shows
        lifecycle = self.core.lifecycle
        memory = Footprint(seen.memory) if seen.memory else None
        if seen.tier is Tier.SLEEPING and entry.state is State.READY:
            if entry.leases:  # the table tells the truth; the next caller's use() wakes it
                log.warning(
                    "%s was put in its warm tier behind our back while %d caller(s) hold or wait for it",
                    entry.name,
                    entry.leases,
                )
            lifecycle.apply(entry, Action.SLEPT_BEHIND, parked=memory or entry.warm)
        elif seen.tier is Tier.ACTIVE and entry.state is State.SLEEPING:
            lifecycle.apply(entry, Action.WOKE_BEHIND, measured=memory or entry.active)
        elif memory is not None and entry.state is State.READY and memory != entry.measured:
            lifecycle.update(entry, measured=memory)
        elif memory is not None and entry.state is State.SLEEPING and memory != entry.parked:
            lifecycle.update(entry, parked=memory)

    def _spec_for(self, provider: str, seen: Observed, key: str) -> ModelSpec:
        """The registry's spec for what ``seen`` shows, else one made up from it (bytes as
        observed; asleep: :func:`awake_footprint`).  A spec made up earlier (an earlier
        adoption, an inline ``provider/target`` name) is made up again from this answer:
        the model found now may not be the size it was."""
        name = f"{provider}/{seen.target}"
        for spec in self.core.specs.values():
            if spec.provider == provider and self.core.key(spec) == key:
                if spec.name in self.core.config.models:
                    return spec
                name = spec.name
                break
        memory = seen.memory if seen.tier is Tier.ACTIVE else awake_footprint(seen, None, self.core.budgets)
        spec = ModelSpec(name=name, provider=provider, target=seen.target, memory=dict(memory))
        self.core.specs[spec.name] = spec
        return spec

    def _adopt(self, provider: Provider, spec: ModelSpec, key: str, seen: Observed) -> Entry:
        """A model found resident: in the table at once (LOADING, counted for what the
        runtime reports), ready once the provider's ``adopt`` says it can serve."""
        core = self.core
        asleep = seen.tier is Tier.SLEEPING
        entry = core.new_entry(
            spec,
            State.LOADING,
            measured=Footprint(seen.memory) if seen.memory else None,
            # until adopted, a model found asleep is counted for what it holds asleep
            estimate=Footprint(seen.memory) if asleep and seen.memory else None,
        )
        entry.owned = seen.owned
        entry.runtime_expires_at = seen.expires_at
        entry.can_park = provider.capabilities.warm_tier and (spec.warm_tier or asleep)
        attempt = Attempt(adoption=True)
        core.spawn(
            lambda: self._adoption(provider, entry, seen, attempt), name=f"modelmora-adopt-{spec.name}"
        )
        entry.attempt = attempt
        core.table.add(entry)
        return entry

    async def _adoption(self, provider: Provider, entry: Entry, seen: Observed, attempt: Attempt) -> None:
        """Adopt ``entry``; its attempt settles in the same step as the row becomes ready,
        goes to its warm tier or leaves the table.  Callers waiting for it take it when
        ready, and otherwise look afresh (an adoption that failed was not their load)."""
        core = self.core
        try:
            try:
                with anyio.fail_after(
                    entry.spec.load_timeout if entry.spec.load_timeout != float("inf") else None
                ):
                    handle = await provider.adopt(seen, entry.spec)
            except Exception as exc:
                core.problem(f"adopt:{entry.name}", exc, entry.name)
                self.transitions.leave(entry, Action.FAIL)
                attempt.again()
                return
            core.recovered(f"adopt:{entry.name}")
            entry.loaded_at = core.clock()
            event = ev.Adopted(
                model=entry.name, provider=provider.name, memory=dict(seen.memory), owned=seen.owned
            )
            if seen.tier is Tier.SLEEPING:
                awake = awake_footprint(seen, entry.spec, core.budgets)
                before = core.history.get(entry.name)  # what it measured when we last loaded it
                core.lifecycle.apply(
                    entry,
                    Action.SLEPT_BEHIND,
                    event,
                    handle=handle,
                    parked=Footprint(seen.memory) if seen.memory else awake.parked(),
                    estimate=awake,  # what its wake reserves, like a load
                    measured=Footprint(seen.awake) if seen.awake else before[0] if before else None,
                )
                attempt.again()  # its callers wake it, through admission
            else:
                core.lifecycle.apply(entry, Action.LOADED, event, handle=handle)
                attempt.ready()
                self.transitions.watch(entry)
        finally:
            if not attempt.done:  # cancelled (shutdown): the row goes, the runtime keeps it
                self.transitions.leave(entry, Action.FAIL)
                attempt.again()


def awake_footprint(seen: Observed, spec: ModelSpec | None, budgets: Mapping[str, int]) -> Footprint:
    """Bytes per device a model the runtime reports asleep will hold once woken: what its
    wake reserves, through the same admission as a load.

    In order: what the runtime reports for it awake (``Observed.awake``); the registry's
    estimate (``spec.memory``; ``spec`` None or without memory: none); else, unknown, the
    conservative answer: the *whole budget* of every accelerator it may wake on (those it
    holds bytes on asleep, else ``spec.device``), so its wake evicts or waits for
    everything else there rather than overcommit the device.  What the model measured
    when this manager last loaded it is kept beside this as its measurement (the wake
    reserves the larger), and a wake measures what it really took, which replaces both."""
    asleep = Footprint(seen.memory)
    if seen.awake:
        return Footprint(seen.awake)
    if spec is not None and spec.memory:
        return Footprint(spec.memory)
    device = spec.device if spec is not None else "cuda:0"
    accelerators = [d for d in asleep if d != "cpu"] or ([device] if device != "cpu" else [])
    return asleep.maximum({d: budgets[d] for d in accelerators if d in budgets})


__all__ = ["Reconciler", "awake_footprint"]
