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

    Loads from host memory (``leases``: leased by the scheduler for each rank's layout) need no
    daemon call: verified and copied before the step's forward, or with ``background`` on a
    loader thread while the request waits. Loads from lower tiers (``budget``) are promoted on a
    loader thread while the request waits, within the budget's allowance. Waiting loads are
    reported through ``get_finished``.
    """

    req_id: str
    block_ids: tuple[int, ...]
    block_hashes: tuple[bytes, ...]
    leases: dict[str, LeasedSlots] = field(default_factory=dict)  # layout id -> slots (synchronous)
    budget: LossBudget | None = None  # asynchronous
    tier: str = "host"  # the deepest tier the blocks come from
    background: bool = False  # host-memory blocks copied off the step

    @property
    def is_async(self) -> bool:
        """The request waits for it (vLLM's asynchronous load): promoted, or copied in the background."""
        return self.budget is not None or self.background


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
    """What the workers report after a step: blocks the daemon now holds, per layout (for KV
    events, which go out once every layout, i.e. every KV shard, holds a block),
    leases whose blocks they copied (the scheduler releases them), step timings (the scheduler's
    prefill estimate), and for each finished asynchronous load, how many leading blocks it brought
    into the engine, how long it waited before asking the daemon and how long the daemon took
    (the scheduler's tier estimates: a load given up early moved fewer bytes, and a reconnect is
    not the tier's cost)."""

    committed: dict[str, set[bytes]] = field(default_factory=dict)  # layout id -> block hashes
    copied_leases: set[int] = field(default_factory=set)
    step_samples: list[tuple[int, float]] = field(default_factory=list)  # (scheduled tokens, seconds)
    async_loaded: dict[str, AsyncLoaded] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVTierWorkerMetadata):
            # Commits stay per layout: with tensor parallelism a block is whole only once every
            # shard's layout holds it, which the scheduler tracks across steps. Each rank copies
            # from its own layout's lease: the union releases them all. A request's load is as
            # far as its slowest rank got.
            committed = {layout_id: set(hashes) for layout_id, hashes in self.committed.items()}
            for layout_id, hashes in other.committed.items():
                committed.setdefault(layout_id, set()).update(hashes)
            loaded = dict(self.async_loaded)
            for req_id, load in other.async_loaded.items():
                loaded[req_id] = min(load, loaded.get(req_id, load))
            return KVTierWorkerMetadata(
                committed, self.copied_leases | other.copied_leases, self.step_samples or other.step_samples, loaded,
            )
        return self
