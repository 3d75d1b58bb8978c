"""One value for "bytes per device": :class:`Footprint`.

Every quantity of memory the core handles — an estimate from the registry, what a load
measured, what a model holds in its warm tier, what an admission reserves — is a
Footprint, and the arithmetic between them lives here and nowhere else.  Devices are
named ``cuda:N`` and ``cpu``; values are bytes (non-negative ints).  A device absent from
a footprint holds 0 bytes there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping


class Footprint(Mapping[str, int]):
    """Immutable bytes per device (``Footprint({"cuda:0": 9 * 10**9})``)."""

    __slots__ = ("_bytes", "_hash")

    def __init__(self, per_device: Mapping[str, int] | None = None):
        self._bytes: dict[str, int] = {d: int(n) for d, n in (per_device or {}).items() if n > 0}
        self._hash: int | None = None

    # -- Mapping ------------------------------------------------------------------------

    def __getitem__(self, device: str) -> int:
        return self._bytes[device]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bytes)

    def __len__(self) -> int:
        return len(self._bytes)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._bytes.items()))
        return self._hash

    def __repr__(self) -> str:
        from .spec import format_memory

        return f"Footprint({format_memory(self._bytes, 'nothing')})"

    # -- arithmetic ---------------------------------------------------------------------

    def on(self, device: str) -> int:
        """Bytes on ``device`` (0 when none)."""
        return self._bytes.get(device, 0)

    @property
    def total(self) -> int:
        """Bytes over all devices (for messages; budgets are per device)."""
        return sum(self._bytes.values())

    def __add__(self, other: Mapping[str, int]) -> Footprint:
        out = dict(self._bytes)
        for device, n in other.items():
            out[device] = out.get(device, 0) + n
        return Footprint(out)

    def __sub__(self, other: Mapping[str, int]) -> Footprint:
        """Per device, never below zero."""
        return Footprint({d: max(0, n - other.get(d, 0)) for d, n in self._bytes.items()})

    def maximum(self, other: Mapping[str, int] | None) -> Footprint:
        """Per device, the larger of the two: what to reserve when either may be true
        (an estimate and a measurement; a warm copy and the woken model)."""
        if not other:
            return self
        devices = set(self._bytes) | set(other)
        return Footprint({d: max(self._bytes.get(d, 0), other.get(d, 0)) for d in devices})

    def parked(self, *, keep_weights: bool = True) -> Footprint:
        """What a model holds once moved to its warm tier, when nothing was measured:
        nothing left on accelerators, its accelerator bytes added to host RAM (or
        dropped, ``keep_weights=False``, as vLLM's sleep level 2 discards weights)."""
        accelerators = sum(n for d, n in self._bytes.items() if d != "cpu")
        return Footprint({"cpu": self.on("cpu") + (accelerators if keep_weights else 0)})

    def as_dict(self) -> dict[str, int]:
        return dict(self._bytes)


EMPTY = Footprint()


def total(footprints: Iterable[Mapping[str, int]]) -> Footprint:
    """Per-device sum."""
    out: dict[str, int] = {}
    for fp in footprints:
        for device, n in fp.items():
            out[device] = out.get(device, 0) + n
    return Footprint(out)


__all__ = ["EMPTY", "Footprint", "total"]
