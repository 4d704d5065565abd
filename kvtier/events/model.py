"""The index's view of the world: which source on which node holds which blocks in which tier.

Vocabulary:

- A **space** is ``(model, block_size)``: kvtier's block hashes cover token ids only, so the same
  tokens hash alike in every model; a space keeps models (and block sizes) apart.
- An **index key** is the first 8 bytes of kvtier's 16-byte block hash, big-endian, as an int
  (``docs/block-identity.md`` allows index entries to shorten the hash). 2^64 keys make a false
  match between two different prefixes of one space vanishingly unlikely, and a false match only
  misroutes: loads check the full hash.
- A **source** is one holder of blocks on a node: a layout id of the daemon (several tensor-parallel
  ranks are several sources), or one engine's KV-event stream (``vllm:<endpoint>``). Holdings are
  per source, so a block two ranks hold is removed from the node only when both dropped it.
- The **S3 tier is shared**: its source is the bucket location (``s3://bucket/prefix``), not the
  node, and every node whose daemon reads that location holds its blocks.

Events are idempotent (a stored block stored again, a removed block removed again, change
nothing), so replays and overlapping re-syncs never leave counts wrong.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from kvtier.blocks.hashing import BLOCK_HASH_BYTES
from kvtier.errors import InvalidRequestError

INDEX_KEY_BYTES = 8


class IndexTier(IntEnum):
    """Where a block is held, fastest first (the order scores prefer)."""

    GPU = 0  # the engine's own paged KV cache (from vLLM's KV events)
    HOST = 1  # kvtier's host-memory arena (or an engine's own CPU offload)
    DISK = 2  # the node's local disk tier
    S3 = 3  # the shared object tier

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> IndexTier:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(tier.label for tier in cls)
            raise InvalidRequestError(f"unknown tier {text!r}; expected one of {names}") from None


SHARED_TIERS = frozenset({IndexTier.S3})
ENGINE_SOURCE_PREFIX = "vllm:"  # sources fed by an engine's own KV events, not by the node's daemon


def is_engine_source(source: str) -> bool:
    return source.startswith(ENGINE_SOURCE_PREFIX)


class Op(IntEnum):
    STORED = 1
    REMOVED = 2


@dataclass(frozen=True, slots=True)
class Space:
    """Blocks of one model and block size (the hash chain they belong to)."""

    model: str
    block_size: int

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidRequestError("an index space needs a model name")
        if type(self.block_size) is not int or self.block_size <= 0:
            raise InvalidRequestError(f"block_size must be a positive integer, got {self.block_size!r}")


def index_key(block_hash: bytes) -> int:
    """The index key of a kvtier block hash (its first 8 bytes, big-endian)."""
    if len(block_hash) != BLOCK_HASH_BYTES:
        raise InvalidRequestError(f"a block hash has {BLOCK_HASH_BYTES} bytes, got {len(block_hash)}")
    return int.from_bytes(block_hash[:INDEX_KEY_BYTES], "big")


def index_keys_of_joined(joined: bytes) -> list[int]:
    """Index keys of concatenated 16-byte hashes (:func:`~kvtier.blocks.hashing.hash_prompt_joined`)."""
    if len(joined) % BLOCK_HASH_BYTES:
        raise InvalidRequestError(f"joined block hashes must be a multiple of {BLOCK_HASH_BYTES} bytes, got {len(joined)}")
    return list(_keys_struct(len(joined) // BLOCK_HASH_BYTES).unpack(joined))


@functools.lru_cache(maxsize=64)
def _keys_struct(count: int) -> struct.Struct:
    return struct.Struct(">" + "Q8x" * count)


def index_keys(block_hashes: list[bytes]) -> list[int]:
    """Index keys of many hashes (16 bytes, or already-shortened 8-byte ones)."""
    if block_hashes and max(map(len, block_hashes)) == BLOCK_HASH_BYTES:
        joined = b"".join(block_hashes)
        if len(joined) == BLOCK_HASH_BYTES * len(block_hashes):  # none longer, so every one is 16 bytes
            return index_keys_of_joined(joined)  # one C call
    keys = []
    for block_hash in block_hashes:
        if len(block_hash) not in (BLOCK_HASH_BYTES, INDEX_KEY_BYTES):
            raise InvalidRequestError(
                f"a block hash has {BLOCK_HASH_BYTES} bytes (or {INDEX_KEY_BYTES} as an index key), got {len(block_hash)}"
            )
        keys.append(int.from_bytes(block_hash[:INDEX_KEY_BYTES], "big"))
    return keys


@dataclass(slots=True)
class BlockEvent:
    """Blocks of one source that became held (``STORED``) or stopped being held in ``tier``."""

    op: Op
    tier: IndexTier
    space: Space
    source: str  # a layout id, "vllm:<endpoint>", or for the S3 tier its location
    keys: list[int]


@dataclass(slots=True)
class PublishBatch:
    """One batch from one node's publisher, in order.

    ``session`` names one run of a publisher, ``seq`` counts its batches from 1 without gaps. A
    batch with ``reset`` starts a full re-sync: everything the node published before (outside the
    shared tiers) is dropped first. An index that sees a gap or an unknown session answers
    RESYNC, and the publisher starts a new session with a reset.
    """

    node: str
    session: str
    seq: int
    reset: bool = False
    events: list[BlockEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ServedLayout:
    """A layout a node's engines registered: what model and block size it serves."""

    layout_id: str
    model: str
    block_size: int
    tp_rank: int = 0
    tp_size: int = 1


@dataclass(slots=True)
class NodeInfo:
    """A node's heartbeat: who it is, where it can be reached, what it serves and holds."""

    node: str
    session: str
    seq: int  # the last batch this session sent
    address: str = ""  # the daemon's TCP address for peers, if any
    s3_location: str = ""  # "s3://bucket/prefix" the node reads, or "" without an S3 tier
    layouts: list[ServedLayout] = field(default_factory=list)
    tier_blocks: dict[str, int] = field(default_factory=dict)  # blocks per tier, as the daemon counts them
    pending_events: int = 0  # block events queued, not yet published (how far behind it is)


@dataclass(slots=True)
class PublisherStatus:
    """What ``kvtier stats`` shows: is the node publishing, and how far behind is it."""

    target: str
    publishing: bool  # the last call to the sink succeeded
    session: str
    seq: int
    pending_events: int  # block changes queued, not yet accepted by the index
    last_published_age_s: float  # since the index last accepted a batch or heartbeat (-1: never)
    resyncs: int
    last_error: str
