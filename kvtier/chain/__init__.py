"""The tier chain: placement, demotion, promotion, eviction, pins and leases, stats."""

from kvtier.chain.chain import TierChain
from kvtier.chain.records import Lease, NotReserved
from kvtier.chain.stats import ChainStats, TierCounters, TierStats

__all__ = ["ChainStats", "Lease", "NotReserved", "TierChain", "TierCounters", "TierStats"]
