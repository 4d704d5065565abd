"""What the scheduler-side connector tells the workers each step, and what they report back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from connectors.vllm.estimates import LossBudget


@dataclass(frozen=True, slots=True)
class LeasedSlots:
    """Blocks of one layout the scheduler leased in the daemon's host arena for a load: where they
    are in the arena of daemon run ``daemon_instance`` and the checksum each must match. The lease
    keeps them in place until the worker reports it copied them (``copied_leases``)."""

    lease_id: int
    daemon_instance: str
    offsets: tuple[int, ...]
    checksums: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Load ``block_hashes[i]`` into engine block ``block_ids[i]``.

    Synchronous loads (``leases``: the blocks are in host memory, leased by the scheduler for each
    rank's layout) are copied before the step's forward without a single daemon call. Asynchronous
    ones (``budget``) are promoted from lower tiers on a loader thread while the request waits,
    within the budget's allowance, and reported through ``get_finished``.
    """

    req_id: str
    block_ids: tuple[int, ...]
    block_hashes: tuple[bytes, ...]
    leases: dict[str, LeasedSlots] = field(default_factory=dict)  # layout id -> slots (synchronous)
    budget: LossBudget | None = None  # asynchronous
    tier: str = "host"  # the deepest tier the blocks come from

    @property
    def is_async(self) -> bool:
        return self.budget is not None


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """Save engine block ``block_ids[i]`` (full and computed after this step) as ``block_hashes[i]``."""

    req_id: str
    block_ids: tuple[int, ...]
    block_hashes: tuple[bytes, ...]


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted_req_ids: set[str] = field(default_factory=set)
    scheduled_tokens: int = 0  # tokens this step computes (the workers time it: prefill rate)


class AsyncLoaded(NamedTuple):
    """How one asynchronous load went, as a worker saw it (ordered: the smallest ``blocks`` wins)."""

    blocks: int  # leading blocks copied into the engine
    before_fetch_s: float  # waited before the daemon was asked (loader queue, reconnect)
    fetch_s: float  # the daemon's promotion and lease


@dataclass
class KVTierWorkerMetadata(KVConnectorWorkerMetadata):
    """What the workers report after a step: blocks committed to the daemon (for KV events),
    leases whose blocks they copied (the scheduler releases them), step timings (the scheduler's
    prefill estimate), and for each finished asynchronous load, how many leading blocks it brought
    into the engine, how long it waited before asking the daemon and how long the daemon took
    (the scheduler's tier estimates: a load given up early moved fewer bytes, and a reconnect is
    not the tier's cost)."""

    committed: set[bytes] = field(default_factory=set)
    copied_leases: set[int] = field(default_factory=set)
    step_samples: list[tuple[int, float]] = field(default_factory=list)  # (scheduled tokens, seconds)
    async_loaded: dict[str, AsyncLoaded] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVTierWorkerMetadata):
            # With tensor parallelism a block is only whole once every rank saved it; the
            # scheduler announces what rank 0 reports (ranks save the same blocks). Each rank
            # copies from its own layout's lease: the union releases them all.
            # A request's load is as far as its slowest rank got.
            loaded = dict(self.async_loaded)
            for req_id, load in other.async_loaded.items():
                loaded[req_id] = min(load, loaded.get(req_id, load))
            return KVTierWorkerMetadata(
                self.committed | other.committed, self.copied_leases | other.copied_leases,
                self.step_samples or other.step_samples, loaded,
            )
        return self
