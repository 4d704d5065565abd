"""Build a tier chain from the configuration: host, then disk and S3 when enabled."""

from __future__ import annotations

from kvtier.chain.chain import TierChain
from kvtier.config import HostTierConfig, KVTierConfig
from kvtier.tiers.base import Tier
from kvtier.tiers.registry import create_tier


def build_chain(config: KVTierConfig, host: HostTierConfig | None = None) -> TierChain:
    """Open every enabled tier (closing the opened ones if a later one fails) and chain them."""
    tiers: list[Tier] = []
    try:
        tiers.append(create_tier("host", host or config.host))
        if config.disk.enabled:
            tiers.append(create_tier("disk", config.disk))
        if config.s3.enabled:
            tiers.append(create_tier("s3", config.s3))
        return TierChain(tiers, config.chain)
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
