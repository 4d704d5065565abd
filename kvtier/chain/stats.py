"""Counters per tier, kept by the chain, and the snapshot it reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass(slots=True)
class TierCounters:
    """Monotonic counters of one tier (reset only by a restart)."""

    hits: int = 0  # reads served from this tier
    misses: int = 0  # reads that looked in this tier and did not find the block
    bytes_in: int = 0  # payload bytes written into this tier
    bytes_out: int = 0  # payload bytes read from this tier
    evictions: int = 0  # blocks removed to make room
    dropped: int = 0  # of those, blocks that had no copy in a lower tier (lost to the cache)
    demotions: int = 0  # blocks copied into this tier from a higher one
    promotions: int = 0  # blocks copied from this tier up into host memory
    corrupt: int = 0  # blocks that failed their checksum here and were deleted
    errors: int = 0  # failed operations (unavailable service, full disk...)

    def add(self, other: TierCounters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(frozen=True, slots=True)
class TierStats:
    name: str
    kind: str
    capacity_bytes: int | None
    used_bytes: int
    blocks: int
    counters: TierCounters = field(default_factory=TierCounters)

    @property
    def hit_rate(self) -> float:
        looked = self.counters.hits + self.counters.misses
        return self.counters.hits / looked if looked else 0.0

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["hit_rate"] = self.hit_rate
        return data


@dataclass(frozen=True, slots=True)
class ChainStats:
    tiers: tuple[TierStats, ...]
    pending_demotions: int
    active_leases: int
    pinned_blocks: int

    def to_dict(self) -> dict[str, object]:
        return {
            "tiers": [tier.to_dict() for tier in self.tiers],
            "pending_demotions": self.pending_demotions,
            "active_leases": self.active_leases,
            "pinned_blocks": self.pinned_blocks,
        }
