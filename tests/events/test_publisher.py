"""The daemon's index publisher against a real tier chain (host + disk) and a real index."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.blocks.hashing import hash_prompt
from kvtier.blocks.keys import BlockKey
from kvtier.chain import TierChain
from kvtier.config import ChainConfig, DiskTierConfig, HostTierConfig, PublishConfig, WriteMode
from kvtier.errors import IndexUnavailableError
from kvtier.events.model import IndexTier, NodeInfo, PublishBatch, ServedLayout, Space
from kvtier.events.publisher import IndexPublisher
from kvtier.index.base import ApplyStatus, TierRun
from kvtier.index.memory import MemoryIndex
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.host import HostTier

BLOCK = 4096
LAYOUT = "0123456789abcdef"
SPACE = Space("llama", 16)
HASHES = hash_prompt(list(range(16 * 24)), 16)


class Switchable:
    """A sink that can be cut off (raises like an unreachable index) or swapped (an index restart)."""

    def __init__(self, index: MemoryIndex) -> None:
        self.index = index
        self.down = threading.Event()

    def publish(self, batch: PublishBatch) -> ApplyStatus:
        if self.down.is_set():
            raise IndexUnavailableError("index down (test)")
        return self.index.publish(batch)

    def heartbeat(self, info: NodeInfo) -> ApplyStatus:
        if self.down.is_set():
            raise IndexUnavailableError("index down (test)")
        return self.index.heartbeat(info)


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[TierChain]:
    tiers = [HostTier(HostTierConfig(capacity=8 * BLOCK, slab_size=BLOCK)),
             DiskTier(DiskTierConfig(path=tmp_path / "disk", capacity=64 * (BLOCK + 4096)))]
    chain = TierChain(tiers, ChainConfig(write_mode=WriteMode.WRITE_THROUGH))
    yield chain
    chain.close()


def make_publisher(chain: TierChain, sink, layouts=None) -> IndexPublisher:
    served = layouts if layouts is not None else [ServedLayout(LAYOUT, SPACE.model, SPACE.block_size)]
    return IndexPublisher(chain, sink, PublishConfig(interval_s=0.02, heartbeat_s=0.1, max_batch_keys=5), node="a",
                          layouts=lambda: served, target="test")


def put(chain: TierChain, hashes: list[bytes]) -> None:
    for h in hashes:
        assert chain.put(BlockKey(LAYOUT, h), bytes(BLOCK))


def runs(index: MemoryIndex, hashes=HASHES) -> list[TierRun]:
    scores = index.score_hashes(SPACE, hashes)
    return scores[0].runs if scores else []


def eventually(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_stores_and_evictions_reach_the_index_per_tier(chain: TierChain) -> None:
    index = MemoryIndex()
    publisher = make_publisher(chain, index)
    try:
        put(chain, HASHES[:12])  # host holds 8: the first 4 were evicted from host, all 12 are on disk
        assert publisher.flush()
        assert runs(index) == [TierRun(IndexTier.DISK, 0, 4), TierRun(IndexTier.HOST, 4, 8)]
        eventually(lambda: index.nodes()[0].info.tier_blocks == {"host": 8, "disk": 12})  # the next heartbeat
        assert index.nodes()[0].info.layouts[0].model == "llama"
        assert publisher.status().publishing and publisher.status().pending_events == 0
    finally:
        publisher.close()


def test_a_restarted_index_gets_the_full_state_again(chain: TierChain) -> None:
    sink = Switchable(MemoryIndex())
    publisher = make_publisher(chain, sink)
    try:
        put(chain, HASHES[:6])
        assert publisher.flush()
        sink.index = MemoryIndex()  # the index restarted empty: the next call answers RESYNC
        put(chain, HASHES[6:8])
        eventually(lambda: runs(sink.index) == [TierRun(IndexTier.HOST, 0, 8)])
        assert publisher.status().resyncs >= 2
    finally:
        publisher.close()


def test_an_unreachable_index_loses_nothing(chain: TierChain) -> None:
    sink = Switchable(MemoryIndex())
    publisher = make_publisher(chain, sink)
    try:
        put(chain, HASHES[:3])
        assert publisher.flush()
        sink.down.set()
        put(chain, HASHES[3:10])  # host overflows: evictions queue as removals
        eventually(lambda: not publisher.status().publishing)
        assert publisher.status().pending_events > 0 and "down" in publisher.status().last_error
        sink.down.clear()
        assert publisher.flush()
        assert runs(sink.index) == [TierRun(IndexTier.DISK, 0, 2), TierRun(IndexTier.HOST, 2, 8)]
    finally:
        publisher.close()


def test_blocks_of_a_layout_registered_later_are_published_after_a_resync(chain: TierChain) -> None:
    index = MemoryIndex()
    served: list[ServedLayout] = []
    publisher = make_publisher(chain, index, served)
    try:
        put(chain, HASHES[:4])
        assert publisher.flush()
        assert runs(index) == []  # not named yet: no layout says which model they belong to
        served.append(ServedLayout(LAYOUT, SPACE.model, SPACE.block_size))
        publisher.request_resync()
        eventually(lambda: runs(index) == [TierRun(IndexTier.HOST, 0, 4)])
    finally:
        publisher.close()
