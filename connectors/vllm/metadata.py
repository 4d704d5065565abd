"""What the scheduler-side connector tells the workers each step, and what they report back."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Load ``block_hashes[i]`` into engine block ``block_ids[i]``.

    Synchronous loads (every block in host memory at lookup time) finish before the step's
    forward; asynchronous ones are promoted from lower tiers in the background and reported
    through ``get_finished`` while the request waits.
    """

    req_id: str
    block_ids: tuple[int, ...]
    block_hashes: tuple[bytes, ...]
    is_async: bool


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


@dataclass
class KVTierWorkerMetadata(KVConnectorWorkerMetadata):
    """Block hashes the workers committed to the daemon since the last step (for KV events)."""

    committed: set[bytes] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVTierWorkerMetadata):
            # With tensor parallelism a block is only whole once every rank saved it; the
            # scheduler announces what rank 0 reports (ranks save the same blocks).
            return KVTierWorkerMetadata(self.committed | other.committed)
        return self
