"""The index interface: what every backend (in memory, Redis) answers, and the query types.

A backend takes publish batches and heartbeats from nodes (:meth:`KVIndex.publish`,
:meth:`KVIndex.heartbeat`) and answers routers (:meth:`KVIndex.score`, :meth:`KVIndex.lookup`,
:meth:`KVIndex.nodes`). Contracts every backend keeps (``tests/index/test_conformance.py``):

- Batches of one node apply in ``seq`` order within a session. A batch or heartbeat from an
  unknown session, or one that skips a ``seq``, is not applied: the answer is ``RESYNC`` and the
  publisher re-sends its full state under a new session, starting with a ``reset`` batch.
- Events are idempotent; a block held by several sources of a node (ranks, engines) stays held
  until the last one removes it.
- A node whose last heartbeat or batch is older than ``heartbeat_ttl_s`` is left out of every
  answer; its holdings are purged soon after. Shared tiers (S3) stay: other nodes read them.
- Queries never do I/O per block; they answer from memory and stop at the first block no
  candidate node holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from kvtier.blocks.hashing import NO_EXTRAS, HashExtras, hash_prompt_joined
from kvtier.errors import InvalidRequestError
from kvtier.events.model import BlockEvent, IndexTier, NodeInfo, PublishBatch, Space
from kvtier.index.walk import Blocks

DEFAULT_TIER_WEIGHTS: dict[IndexTier, float] = {
    # The share of recomputing a block that holding it saves, from benchmarks/ttft.py on this
    # project's machine: GPU blocks need no load; a host hit took 0.03-0.18 of recomputing's
    # TTFT, a disk hit 0.08-0.21; S3 depends on the link (over moto_server it did not pay).
    IndexTier.GPU: 1.0,
    IndexTier.HOST: 0.9,
    IndexTier.DISK: 0.8,
    IndexTier.S3: 0.5,
}


class ApplyStatus(Enum):
    OK = "ok"
    RESYNC = "resync"  # unknown session or a gap in seq: send the full state again


class TierRun(NamedTuple):
    """``blocks`` consecutive blocks of a node's cached prefix, from block ``start``, held in
    ``tier`` (a named tuple: a score builds dozens of these per query)."""

    tier: IndexTier
    start: int
    blocks: int


@dataclass(slots=True)
class NodeScore:
    """One node's longest cached prefix of a prompt, and what it is worth."""

    node: str
    blocks: int
    tokens: int
    runs: list[TierRun]  # consecutive, from block 0; each block in the fastest tier that holds it
    score: float  # sum over the prefix's blocks of the weight of the tier it is in


@dataclass(frozen=True, slots=True)
class Holding:
    node: str
    tier: IndexTier


@dataclass(slots=True)
class NodeStatus:
    """What :meth:`KVIndex.nodes` reports per node."""

    info: NodeInfo
    heartbeat_age_s: float
    alive: bool
    indexed_blocks: dict[str, int] = field(default_factory=dict)  # per tier, as the index holds them


class KVIndex(ABC):
    """Where blocks live across the fleet (see the module docstring for the contracts)."""

    @abstractmethod
    def publish(self, batch: PublishBatch) -> ApplyStatus: ...

    @abstractmethod
    def heartbeat(self, info: NodeInfo) -> ApplyStatus: ...

    @abstractmethod
    def apply_engine_events(self, node: str, events: list[BlockEvent]) -> None:
        """Events translated from an engine's own KV-event stream (sources ``vllm:...``).

        They carry no session: the subscriber keeps their order and clears its source after a
        gap it cannot replay. They keep the node alive (a node may run engines without a
        daemon). A reset of the node's daemon never drops them; expiry of the node does.
        """

    @abstractmethod
    def score_blocks(self, space: Space, blocks: Blocks, candidates: Sequence[str] | None = None) -> list[NodeScore]:
        """Every candidate node (default: every live node) with a cached prefix of ``blocks``
        (joined 16-byte hashes, a list of hashes or a list of index keys), best first."""

    def score_keys(self, space: Space, keys: Sequence[int], candidates: Sequence[str] | None = None) -> list[NodeScore]:
        return self.score_blocks(space, list(keys), candidates)

    @abstractmethod
    def lookup(self, space: Space, keys: Sequence[int]) -> list[list[Holding]]:
        """For each key, the live nodes and tiers holding it."""

    @abstractmethod
    def nodes(self) -> list[NodeStatus]: ...

    @abstractmethod
    def spaces(self) -> list[Space]:
        """The (model, block size) pairs the index holds blocks of or nodes serve."""

    def close(self) -> None:
        """Release threads and connections."""

    # ---- derived helpers -------------------------------------------------------------------

    def space_of(self, model: str, block_size: int | None = None) -> Space:
        """The space to score ``model`` in: the given block size, or the one the index knows."""
        if block_size is not None:
            return Space(model, block_size)
        sizes = sorted({space.block_size for space in self.spaces() if space.model == model})
        if not sizes:
            raise InvalidRequestError(f"the index knows no block size for model {model!r}: no node serves it yet; pass block_size")
        if len(sizes) > 1:
            raise InvalidRequestError(f"model {model!r} is served with block sizes {sizes}; pass block_size")
        return Space(model, sizes[0])

    def score_hashes(self, space: Space, block_hashes: Sequence[bytes], candidates: Sequence[str] | None = None) -> list[NodeScore]:
        return self.score_blocks(space, list(block_hashes), candidates)

    def score_tokens(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        block_size: int | None = None,
        extras: HashExtras = NO_EXTRAS,
        candidates: Sequence[str] | None = None,
    ) -> list[NodeScore]:
        """Hash ``token_ids`` with kvtier's spec (``docs/block-identity.md``) and score the blocks."""
        space = self.space_of(model, block_size)
        return self.score_blocks(space, hash_prompt_joined(token_ids, space.block_size, extras), candidates)
