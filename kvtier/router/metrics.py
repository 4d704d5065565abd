"""The router's Prometheus metrics (served on its own ``/metrics``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvtier_router_requests", "Requests sent to each replica", ["replica", "policy"], registry=r)
        self.responses = Counter("kvtier_router_responses", "Replies by replica and HTTP status", ["replica", "status"], registry=r)
        self.cached_fraction = Histogram("kvtier_router_cached_fraction",
                                         "Share of the prompt the index said the chosen replica's node caches",
                                         buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0), registry=r)
        self.index_seconds = Histogram("kvtier_router_index_seconds", "Time to get the index's scores (answered calls)",
                                       buckets=_FAST, registry=r)
        self.tokenize_seconds = Histogram("kvtier_router_tokenize_seconds", "Time to tokenize a prompt", buckets=_FAST, registry=r)
        self.fallbacks = Counter("kvtier_router_fallbacks", "Requests routed without index scores, or retried elsewhere, by reason",
                                 ["reason"], registry=r)
        self.first_byte_seconds = Histogram("kvtier_router_first_byte_seconds",
                                            "From the request's arrival to the replica's first response bytes", buckets=_TTFT,
                                            registry=r)
        self.replica_up = Gauge("kvtier_router_replica_up", "1 while the replica is in rotation", ["replica"], registry=r)
        self.in_flight = Gauge("kvtier_router_in_flight", "Requests sent to the replica and not finished", ["replica"], registry=r)
