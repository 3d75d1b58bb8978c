"""The residency table: one row per model resident or in transition, and read-only views.

The table is the manager's only mutable state.  Callers outside the core get frozen
:class:`EntryView` copies (a status page cannot change a row by accident); the planner
gets frozen :class:`~modelmora.core.planner.Resident` snapshots.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..footprint import Footprint, total
from .lifecycle import STABLE, Entry, State
from .planner import Resident


@dataclass(frozen=True, slots=True)
class EntryView:
    """A copy of one row, for status pages, metrics and tests."""

    name: str
    provider: str
    target: str
    state: State
    holders: int
    waiters: int  # callers waiting for it, in any state (those queued at its gate too)
    queued: int  # of the waiters, those queued at its gate behind an admission: they yield to it
    pinned: bool
    owned: bool
    group: str | None
    memory: dict[str, int]  # bytes per device it is counted for now
    last_used: float
    loaded_at: float | None
    total_leases: int

    @property
    def leases(self) -> int:
        return self.holders + self.waiters


class Table:
    """Rows by registry name."""

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        self._rows: dict[str, Entry] = {}

    def get(self, name: str) -> Entry | None:
        return self._rows.get(name)

    def add(self, entry: Entry) -> None:
        if entry.name in self._rows:
            raise RuntimeError(f"{entry.name!r} is already in the table")
        self._rows[entry.name] = entry

    def remove(self, entry: Entry) -> None:
        """Drop ``entry`` if it is still the row for its name."""
        if self._rows.get(entry.name) is entry:
            del self._rows[entry.name]

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._rows.values()))

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    def of_provider(self, provider: str) -> list[Entry]:
        return [e for e in self._rows.values() if e.provider == provider]

    def usage(self) -> Footprint:
        """Bytes per device the rows are counted for: reservations included, and memory
        being freed for an admitted model counted once, as that model's reservation (the
        load starts only once it is free, so this is never below what runtimes hold)."""
        return total(e.planned() for e in self._rows.values())

    def residents(self, exclude: Entry | None = None, deciding: str | None = None) -> list[Resident]:
        """The planner's snapshot of every row but ``exclude``, as seen by the admission of
        ``deciding``: callers queued at a row's gate behind that admission yield to it."""
        return [resident(e, deciding) for e in self._rows.values() if e is not exclude]

    def busy(self, exclude: Entry | None = None) -> str | None:
        """What keeps a background load waiting, e.g. ``"'qwen' is loading"``: another
        row loading or waking, queued for memory, or with callers waiting for it (to load,
        wake, unload or at its gate); None when the table is quiet."""
        for e in self._rows.values():
            if e is exclude:
                continue
            if e.state in (State.QUEUED, State.LOADING, State.WAKING):
                return f"{e.name!r} is {'waiting for memory' if e.state is State.QUEUED else e.state.value}"
            if e.waiters:
                return f"callers wait for {e.name!r}"
        return None

    def views(self) -> list[EntryView]:
        return [view(e) for e in self._rows.values()]


def resident(e: Entry, deciding: str | None = None) -> Resident:
    leases = e.leases
    if deciding is not None and e.gate is not None and deciding in e.gate.admissions:
        leases -= e.gate.queued  # they queue behind this admission: they yield to it
    return Resident(
        name=e.name,
        memory=e.planned(),
        leases=leases,
        pinned=e.pinned,
        group=e.spec.group,
        last_used=e.last_used,
        sleep_memory=e.warm if e.can_park else None,
        sleeping=e.state is State.SLEEPING,
        settled=e.state in STABLE,
        key=f"{e.provider}/{e.key}",
        queued=e.state is State.QUEUED,
        in_flight=e.in_flight,
        unknown_on=e.spec.runs_on if e.in_flight and e.size_unknown else (),  # every GPU of a gpus: N model
    )


def view(e: Entry) -> EntryView:
    return EntryView(
        name=e.name,
        provider=e.provider,
        target=e.spec.target,
        state=e.state,
        holders=e.holders,
        waiters=e.waiters,
        queued=e.gate.queued if e.gate is not None else 0,
        pinned=e.pinned,
        owned=e.owned,
        group=e.spec.group,
        memory=e.held().as_dict(),
        last_used=e.last_used,
        loaded_at=e.loaded_at,
        total_leases=e.total_leases,
    )


__all__ = ["EntryView", "Table", "resident", "view"]
