"""Where other nodes hold blocks: the shared index, asked from a daemon's lookup path.

Wraps whatever the daemon publishes to (``kvtier index serve`` through :class:`IndexClient`, or
Redis directly through a :class:`KVIndex`), with a short deadline of its own: an index that is
slow or down makes a lookup find no peers, never makes it wait. Node addresses come from the
nodes' heartbeats and are refreshed every few seconds in the background of those calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from kvtier.blocks.layout import KVLayout
from kvtier.config import KVTierConfig
from kvtier.errors import KVTierError
from kvtier.events.model import Space, index_keys
from kvtier.events.sinks import index_client_for
from kvtier.index.base import Holding, KVIndex, NodeStatus
from kvtier.index.factory import REDIS_SCHEMES

log = logging.getLogger(__name__)


class BlockDirectory:
    def __init__(self, index: object, node: str, *, nodes_ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.index = index
        self.node = node
        self._nodes_ttl_s = nodes_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._addresses: dict[str, str] = {}
        self._nodes_at = float("-inf")
        self.errors = 0

    def holdings(self, layout: KVLayout, block_hashes: Sequence[bytes]) -> list[list[Holding]]:
        """Per block, the live nodes and tiers the index says hold it; [] when the index fails."""
        if not block_hashes:
            return []
        try:
            if isinstance(self.index, KVIndex):
                return self.index.lookup(Space(layout.model, layout.block_size), index_keys(list(block_hashes)))
            return self.index.lookup(layout.model, list(block_hashes), block_size=layout.block_size)  # IndexClient
        except KVTierError as exc:
            self.errors += 1
            log.debug("index lookup for peers failed: %s", exc)
            return []

    def address_of(self, node: str) -> str | None:
        """The TCP address ``node``'s daemon advertised for peers (None: unknown or none)."""
        return self.peers().get(node)

    def peers(self) -> dict[str, str]:
        """Every live node with an advertised address (refreshed at most every few seconds)."""
        if self._clock() - self._nodes_at > self._nodes_ttl_s:
            self._refresh()
        with self._lock:
            return {node: address for node, address in self._addresses.items() if address}

    def _refresh(self) -> None:
        try:
            statuses: list[NodeStatus] = self.index.nodes()
        except KVTierError as exc:
            self.errors += 1
            log.debug("listing the index's nodes failed: %s", exc)
            statuses = []
        with self._lock:
            self._nodes_at = self._clock()
            if statuses:
                self._addresses = {s.info.node: s.info.address for s in statuses if s.alive}


def open_directory(config: KVTierConfig) -> BlockDirectory | None:
    """The directory over the index the daemon publishes to; None without a shared one (the
    daemon's own in-memory index knows only itself)."""
    target = (config.publish.index or "").strip()
    if not target:
        return None
    publish = config.publish
    if target.startswith(REDIS_SCHEMES):
        from kvtier.index.redis import RedisIndex

        # A replica of the index in this daemon: lookups answer from memory, without a round trip.
        index: object = RedisIndex.from_url(target, password_file=publish.redis_password_file, tls_ca_file=publish.tls_ca_file,
                                            namespace=publish.namespace, heartbeat_ttl_s=config.index.heartbeat_ttl_s)
    else:
        index = index_client_for(config, timeout_s=config.peer.index_timeout_s)
    return BlockDirectory(index, config.daemon.node)


def close_directory(directory: BlockDirectory) -> None:
    close = getattr(directory.index, "close", None)
    if close is not None:
        close()
