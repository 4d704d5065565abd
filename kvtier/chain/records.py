"""The chain's catalogue entries and leases (bookkeeping only; the chain's lock guards them)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvtier.blocks.keys import BlockKey
from kvtier.tiers.host import Slot


@dataclass(slots=True)
class BlockRecord:
    """Where one block lives. ``tiers`` is a bitmask over the chain's tier indices (bit 0 = host).

    Invariants: a host copy with ``pins > 0`` is never evicted, so its arena slot is never reused
    while a reader or a demotion holds it; an unsettled host copy is never evicted either.
    """

    nbytes: int
    checksum: int | None  # XXH3-64 of the payload; None until read back when found by a scan
    tiers: int = 0
    pins: int = 0
    # False while the host copy waits for (or is in) its demotion: such a block is not evicted
    # from host memory, new writes are refused instead, so a prefix is not lost to a burst.
    settled: bool = True

    def in_tier(self, index: int) -> bool:
        return bool(self.tiers >> index & 1)

    def held_below(self, index: int) -> bool:
        return self.tiers >> (index + 1) != 0


@dataclass(slots=True)
class Lease:
    """Pins on host copies of ``keys`` until released or ``expires_at`` (chain clock seconds).

    ``locations[i]`` is the arena slot and recorded XXH3-64 checksum of ``keys[i]``'s host copy;
    the slot's bytes stay put while the lease holds."""

    lease_id: int
    keys: tuple[BlockKey, ...]
    expires_at: float
    locations: tuple[tuple[Slot, int], ...]


class NotReserved(Enum):
    """Why :meth:`TierChain.reserve_absent` reserved no slot for a key."""

    PRESENT = "present"  # the chain holds the block already (in some tier)
    NO_SPACE = "no_space"  # every host slot is taken by pinned blocks or blocks awaiting demotion
