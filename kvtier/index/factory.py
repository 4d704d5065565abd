"""Build the index backend a store setting names: ``memory``, or a Redis URL (imported lazily)."""

from __future__ import annotations

from kvtier.config import IndexConfig
from kvtier.errors import ConfigError
from kvtier.events.model import IndexTier
from kvtier.index.base import KVIndex

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def tier_weights(config: IndexConfig) -> dict[IndexTier, float]:
    return {IndexTier.parse(tier): weight for tier, weight in config.weights.items()}


def make_index(config: IndexConfig) -> KVIndex:
    store = config.store.strip()
    if store == "memory":
        from kvtier.index.memory import MemoryIndex

        return MemoryIndex(heartbeat_ttl_s=config.heartbeat_ttl_s, weights=tier_weights(config))
    if store.startswith(REDIS_SCHEMES):
        from kvtier.index.redis import RedisIndex

        return RedisIndex.from_url(store, password_file=config.redis_password_file, tls_ca_file=config.redis_tls_ca_file,
                                   namespace=config.namespace, heartbeat_ttl_s=config.heartbeat_ttl_s,
                                   weights=tier_weights(config))
    raise ConfigError(f"index.store must be 'memory' or a Redis URL (redis://, rediss://), got {store!r}")
