"""The replicas a router sends requests to, and what it knows of each: up or down, its load.

A replica is a vLLM OpenAI server (its base URL) and, where known, the kvtier node whose daemon
caches its blocks (the name the index scores). Load comes from two places: the router's own
count of requests it sent and has not finished (current to the request), and the replica's
``/metrics`` (``vllm:num_requests_running`` and ``vllm:num_requests_waiting``, polled), which
also counts other routers' and clients' requests. A replica that refuses connections or fails
its poll is taken out of rotation and tried again (``GET /health``) until it answers.

Invariants: ``in_flight`` and ``pending_prefill_tokens`` only change on the router's event loop
(no locks); a request's accounting is undone exactly once, whatever way it ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from kvtier.errors import ConfigError
from kvtier.index.fast_server import host_and_port

log = logging.getLogger(__name__)

RUNNING_METRIC = "vllm:num_requests_running"
WAITING_METRIC = "vllm:num_requests_waiting"
FAILED_POLLS_BEFORE_OUT = 3


@dataclass(frozen=True)
class ServedModel:
    root: str  # path or hub name
    parent: str | None = None  # a LoRA adapter's base model (its served id)


@dataclass(eq=False)
class Replica:
    url: str  # base URL, without a trailing slash
    node: str | None = None  # the kvtier node holding its blocks (explicit, or found by address)
    node_explicit: bool = False
    up: bool = True
    down_reason: str = ""
    in_flight: int = 0  # requests this router sent and has not finished
    pending_prefill_tokens: int = 0  # prompt tokens to compute of those without a first token yet
    running: int = 0  # from the replica's /metrics (every client's requests)
    waiting: int = 0
    failed_polls: int = 0  # in a row
    models: dict[str, ServedModel] = field(default_factory=dict)  # by served model id (its /v1/models)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def load(self) -> int:
        """Requests in the replica: the router's own count, or the replica's if it knows more."""
        return max(self.in_flight, self.running + self.waiting)

    def take_out(self, reason: str) -> None:
        if self.up:
            log.warning("replica %s taken out of rotation: %s", self.url, reason)
        self.up = False
        self.down_reason = reason

    def put_back(self) -> None:
        if not self.up:
            log.info("replica %s is back in rotation", self.url)
        self.up = True
        self.failed_polls = 0
        self.down_reason = ""

    def observe_metrics(self, text: str) -> None:
        """Running and waiting requests from a Prometheus exposition (summed over labels)."""
        running = waiting = 0.0
        for family in text_string_to_metric_families(text):
            if family.name in (RUNNING_METRIC, WAITING_METRIC):
                total = sum(sample.value for sample in family.samples)
                if family.name == RUNNING_METRIC:
                    running = total
                else:
                    waiting = total
        self.running, self.waiting = int(running), int(waiting)
        self.failed_polls = 0

    def poll_failed(self, reason: str) -> None:
        """A poll that reached the replica but got no good answer: out after a few in a row."""
        self.failed_polls += 1
        if self.failed_polls >= FAILED_POLLS_BEFORE_OUT:
            self.take_out(f"{reason} ({self.failed_polls} polls in a row)")

    def describe(self) -> str:
        return self.node or self.url


def parse_replica(spec: str) -> Replica:
    """``URL`` or ``NODE=URL``; the URL is http(s) with a host and port."""
    node, sep, url = spec.partition("=")
    if not sep or "://" in node:
        node, url = "", spec
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"a replica is URL or NODE=URL with an http(s) URL such as http://10.0.0.5:8000; got {spec!r}")
    if parts.path or parts.query:
        raise ConfigError(f"a replica's URL is its server's base URL (no path, the router adds /v1/...); got {spec!r}")
    return Replica(url, node.strip() or None, node_explicit=bool(node.strip()))


def parse_dns_target(text: str) -> tuple[str, int]:
    """``dns:NAME:PORT`` (or ``NAME:PORT``): a headless Service whose addresses are the replicas."""
    return host_and_port(text.removeprefix("dns:"), "router.replicas_dns (dns:NAME:PORT)")


def nodes_by_host(addresses: dict[str, str]) -> dict[str, str]:
    """Node names by the host of the address each daemon advertises (its heartbeat's)."""
    found: dict[str, str] = {}
    for node, address in addresses.items():
        if not address or address.startswith("unix:"):
            continue  # a daemon reachable on its socket only
        try:
            host, _port = host_and_port(address, "address")
        except ConfigError:
            host = address.strip("[]")
        found[host] = node
    return found
