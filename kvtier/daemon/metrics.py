"""Prometheus metrics of the daemon: per-tier gauges and counters read from the chain at scrape
time, and RPC latency per method and status code."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvtier.chain.stats import TierCounters

if TYPE_CHECKING:
    from kvtier.daemon.core import DaemonCore
    from kvtier.transport.service import PeerServicer

REGISTRY = CollectorRegistry()

RPC_LATENCY = Histogram(
    "kvtier_rpc_latency_seconds",
    "Time the daemon spent serving an RPC.",
    ["method", "code"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
    registry=REGISTRY,
)

_COUNTER_HELP = {
    "hits": "Reads served from the tier.",
    "misses": "Reads that looked in the tier and did not find the block.",
    "bytes_in": "Payload bytes written into the tier.",
    "bytes_out": "Payload bytes read from the tier.",
    "evictions": "Blocks evicted from the tier to make room.",
    "dropped": "Evicted blocks that had no copy in a lower tier.",
    "demotions": "Blocks copied into the tier from a higher one.",
    "promotions": "Blocks copied from the tier up into host memory.",
    "corrupt": "Blocks that failed their checksum in the tier and were deleted.",
    "errors": "Failed tier operations.",
}


class ChainCollector(Collector):
    """Reads the chain's stats on each scrape (no state of its own)."""

    def __init__(self, core: DaemonCore, peer_service: PeerServicer | None = None) -> None:
        self.core = core
        self.peer_service = peer_service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats, reservations = self.core.stats()
        labels = ["tier", "kind"]
        capacity = GaugeMetricFamily("kvtier_tier_capacity_bytes", "Tier capacity (0 = unbounded).", labels=labels)
        used = GaugeMetricFamily("kvtier_tier_used_bytes", "Bytes held by the tier.", labels=labels)
        blocks = GaugeMetricFamily("kvtier_tier_blocks", "Blocks held by the tier.", labels=labels)
        counters = {
            f.name: CounterMetricFamily(f"kvtier_tier_{f.name}", _COUNTER_HELP[f.name], labels=labels)
            for f in fields(TierCounters)
        }
        for tier in stats.tiers:
            values = [tier.name, tier.kind]
            capacity.add_metric(values, tier.capacity_bytes or 0)
            used.add_metric(values, tier.used_bytes)
            blocks.add_metric(values, tier.blocks)
            for name, family in counters.items():
                family.add_metric(values, getattr(tier.counters, name))
        yield capacity
        yield used
        yield blocks
        yield from counters.values()
        yield GaugeMetricFamily("kvtier_pending_demotions", "Blocks waiting to be written to lower tiers.", value=stats.pending_demotions)
        yield GaugeMetricFamily("kvtier_active_leases", "Leases held by clients.", value=stats.active_leases)
        yield GaugeMetricFamily("kvtier_pinned_blocks", "Host blocks pinned by leases or demotions.", value=stats.pinned_blocks)
        yield GaugeMetricFamily("kvtier_active_reservations", "Arena slots reserved and not yet committed.", value=reservations)
        yield from self._peer_metrics()

    def _peer_metrics(self) -> Iterator[CounterMetricFamily]:
        """Peer fetches by data path and failures by reason (the puller); blocks served (the holder).
        The peer tier's blocks and bytes are the ``kvtier_tier_*{tier="peer"}`` series above."""
        peers = self.core.peers
        if peers is not None:
            fetches = CounterMetricFamily("kvtier_peer_fetches", "Peer fetches that moved blocks, by data path.", labels=["transport"])
            failures = CounterMetricFamily("kvtier_peer_fetch_failures", "Peer fetches that failed, by reason.", labels=["reason"])
            by_transport, by_reason, adopted = peers.counts()
            for transport, count in by_transport.items():
                fetches.add_metric([transport], count)
            for reason, count in by_reason.items():
                failures.add_metric([reason], count)
            yield fetches
            yield failures
            yield CounterMetricFamily("kvtier_shared_blocks_adopted", "Blocks other nodes wrote to the shared S3 bucket, "
                                      "found through the index.", value=adopted)
        if self.peer_service is not None:
            yield CounterMetricFamily("kvtier_peer_served_blocks", "Blocks this daemon streamed to peers over the TCP path.",
                                      value=self.peer_service.served_blocks)
            yield CounterMetricFamily("kvtier_peer_offered_blocks", "Blocks this daemon offered (pinned) to peers.",
                                      value=self.peer_service.offered_blocks)


def serve_metrics(address: str, core: DaemonCore, peer_service: PeerServicer | None = None) -> tuple[object, object]:
    """Start the /metrics HTTP endpoint on ``host:port``; returns (server, thread)."""
    host, _, port = address.rpartition(":")
    collector = ChainCollector(core, peer_service)
    REGISTRY.register(collector)
    server, thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
    server.kvtier_collector = collector  # type: ignore[attr-defined]
    return server, thread


def stop_metrics(server: object) -> None:
    server.shutdown()  # type: ignore[attr-defined]
    server.server_close()  # type: ignore[attr-defined]
    REGISTRY.unregister(server.kvtier_collector)  # type: ignore[attr-defined]
