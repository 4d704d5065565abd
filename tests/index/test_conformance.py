"""Behaviour every index backend keeps (``kvtier/index/base.py``), run against each one."""

from __future__ import annotations

import random
import time
import uuid

import pytest

from kvtier.blocks.hashing import hash_prompt
from kvtier.events.model import BlockEvent, IndexTier, NodeInfo, Op, PublishBatch, ServedLayout, Space, index_key
from kvtier.index.base import ApplyStatus, TierRun
from tests.index.conftest import IndexFactory

SPACE = Space("llama", 16)
S3 = "s3://bucket/kvtier"


class Node:
    """A publisher in miniature: one session, batches in order."""

    def __init__(self, index, name: str, s3_location: str = "") -> None:
        self.index, self.name, self.s3_location = index, name, s3_location
        self.session, self.seq = "", 0

    def start(self, *events: BlockEvent) -> None:
        self.session, self.seq = uuid.uuid4().hex, 1
        assert self.index.publish(PublishBatch(self.name, self.session, 1, True, list(events))) is ApplyStatus.OK
        self.beat()

    def send(self, *events: BlockEvent) -> ApplyStatus:
        self.seq += 1
        return self.index.publish(PublishBatch(self.name, self.session, self.seq, False, list(events)))

    def beat(self) -> ApplyStatus:
        layout = ServedLayout("0123456789abcdef", SPACE.model, SPACE.block_size)
        info = NodeInfo(self.name, self.session, self.seq, s3_location=self.s3_location, layouts=[layout])
        return self.index.heartbeat(info)


def keys(n: int, salt: int = 0) -> list[int]:
    return [index_key(h) for h in hash_prompt([salt * 100_000 + i for i in range(n * 16)], 16)]


def stored(tier: IndexTier, ks: list[int], source: str = "0123456789abcdef") -> BlockEvent:
    return BlockEvent(Op.STORED, tier, SPACE, source, ks)


def removed(tier: IndexTier, ks: list[int], source: str = "0123456789abcdef") -> BlockEvent:
    return BlockEvent(Op.REMOVED, tier, SPACE, source, ks)


def test_the_longest_prefix_ranks_first_with_its_tiers(index_factory: IndexFactory) -> None:
    index, settle = index_factory()
    prompt = keys(10)
    a, b = Node(index, "a"), Node(index, "b")
    a.start(stored(IndexTier.HOST, prompt[:6]), stored(IndexTier.DISK, prompt[4:10]))
    b.start(stored(IndexTier.GPU, prompt[:3]))
    settle()
    scores = index.score_keys(SPACE, prompt)
    assert [s.node for s in scores] == ["a", "b"]
    assert scores[0].blocks == 10 and scores[0].tokens == 160
    assert scores[0].runs == [TierRun(IndexTier.HOST, 0, 6), TierRun(IndexTier.DISK, 6, 4)]
    assert scores[1].runs == [TierRun(IndexTier.GPU, 0, 3)]
    assert scores[0].score == pytest.approx(6 * 0.9 + 4 * 0.8)
    assert index.score_keys(SPACE, prompt, candidates=["b"])[0].node == "b"
    assert index.score_keys(Space("other", 16), prompt) == []
    assert index.score_keys(SPACE, keys(5, salt=1)) == []


def test_a_prefix_stops_at_its_first_missing_block(index_factory: IndexFactory) -> None:
    index, settle = index_factory()
    prompt = keys(8)
    a = Node(index, "a")
    a.start(stored(IndexTier.HOST, prompt[:3] + prompt[4:]))
    settle()
    assert index.score_keys(SPACE, prompt)[0].blocks == 3


def test_a_gap_or_an_unknown_session_asks_for_a_resync(index_factory: IndexFactory) -> None:
    index, settle = index_factory()
    prompt = keys(4)
    a = Node(index, "a")
    assert index.publish(PublishBatch("a", "nobody", 5, False, [stored(IndexTier.HOST, prompt)])) is ApplyStatus.RESYNC
    assert index.heartbeat(NodeInfo("a", "nobody", 5)) is ApplyStatus.RESYNC
    a.start(stored(IndexTier.HOST, prompt[:2]))
    a.seq += 1  # a batch lost on the way
    assert a.send(stored(IndexTier.HOST, prompt[2:])) is ApplyStatus.RESYNC
    settle()
    assert index.score_keys(SPACE, prompt)[0].blocks == 2  # the batch after the gap was not applied


def test_a_reset_replaces_what_the_node_published_before(index_factory: IndexFactory) -> None:
    index, settle = index_factory()
    prompt = keys(6)
    a = Node(index, "a")
    a.start(stored(IndexTier.HOST, prompt))
    a.start(stored(IndexTier.DISK, prompt[:2]))
    settle()
    [score] = index.score_keys(SPACE, prompt)
    assert score.runs == [TierRun(IndexTier.DISK, 0, 2)]


def test_events_are_idempotent_and_sources_count_separately(index_factory: IndexFactory) -> None:
    index, settle = index_factory()
    prompt = keys(4)
    a = Node(index, "a")
    a.start(stored(IndexTier.HOST, prompt, "rank0"), stored(IndexTier.HOST, prompt, "rank1"))
    assert a.send(stored(IndexTier.HOST, prompt, "rank0")) is ApplyStatus.OK  # a replay changes nothing
    assert a.send(removed(IndexTier.HOST, prompt, "rank0")) is ApplyStatus.OK
    settle()
    assert index.score_keys(SPACE, prompt)[0].blocks == 4  # rank1 still holds them
    assert a.send(removed(IndexTier.HOST, prompt, "rank0"), removed(IndexTier.HOST, prompt[2:], "rank1")) is ApplyStatus.OK
    settle()
    assert index.score_keys(SPACE, prompt)[0].blocks == 2


def test_s3_blocks_are_held_by_every_node_that_reads_the_bucket(index_factory: IndexFactory) -> None:
    index, settle = index_factory()
    prompt = keys(5)
    writer, reader, stranger = Node(index, "writer", S3), Node(index, "reader", S3), Node(index, "stranger")
    writer.start(stored(IndexTier.S3, prompt, f"{S3}/0123456789abcdef"), stored(IndexTier.HOST, prompt[:2]))
    reader.start()
    stranger.start()
    settle()
    scores = {s.node: s for s in index.score_keys(SPACE, prompt)}
    assert set(scores) == {"writer", "reader"}
    assert scores["reader"].runs == [TierRun(IndexTier.S3, 0, 5)]
    assert scores["writer"].runs == [TierRun(IndexTier.HOST, 0, 2), TierRun(IndexTier.S3, 2, 3)]
    holdings = index.lookup(SPACE, prompt[:1])[0]
    assert {(h.node, h.tier) for h in holdings} == {("writer", IndexTier.HOST), ("writer", IndexTier.S3), ("reader", IndexTier.S3)}
    # a reset of the writer keeps the bucket's blocks; a deletion from the bucket removes them for all
    writer.start()
    settle()
    assert {s.node for s in index.score_keys(SPACE, prompt)} == {"writer", "reader"}
    assert reader.send(removed(IndexTier.S3, prompt[3:], f"{S3}/0123456789abcdef")) is ApplyStatus.OK
    settle()
    assert [s.blocks for s in index.score_keys(SPACE, prompt)] == [3, 3]


def test_a_silent_node_leaves_the_scores_within_its_ttl(index_factory: IndexFactory) -> None:
    index, settle = index_factory(heartbeat_ttl_s=0.6)
    prompt = keys(3)
    a, b = Node(index, "a"), Node(index, "b")
    a.start(stored(IndexTier.HOST, prompt))
    b.start(stored(IndexTier.HOST, prompt))
    settle()
    assert len(index.score_keys(SPACE, prompt)) == 2
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        b.beat()
        if [s.node for s in index.score_keys(SPACE, prompt)] == ["b"]:
            break
        time.sleep(0.1)
    assert [s.node for s in index.score_keys(SPACE, prompt)] == ["b"]
    statuses = {s.info.node: s for s in index.nodes()}
    assert statuses["b"].alive and ("a" not in statuses or not statuses["a"].alive)


def test_nodes_report_layouts_and_indexed_blocks(index_factory: IndexFactory) -> None:
    index, settle = index_factory()
    a = Node(index, "a")
    a.start(stored(IndexTier.HOST, keys(3)), stored(IndexTier.DISK, keys(2)))
    settle()
    [status] = index.nodes()
    assert status.info.node == "a" and status.alive
    assert status.info.layouts[0].model == "llama"
    assert status.indexed_blocks == {"host": 3, "disk": 2}
    assert index.spaces() == [SPACE]
    assert index.space_of("llama") == SPACE


def test_many_nodes_agree_with_a_simple_model(index_factory: IndexFactory) -> None:
    """Random stores and removals over 80 nodes (more than one word of slots) and 4 tiers."""
    index, settle = index_factory()
    rng = random.Random(7)
    prompt = keys(40)
    nodes = [Node(index, f"n{i}") for i in range(80)]
    model: dict[tuple[str, IndexTier], set[int]] = {}
    for node in nodes:
        node.start()
    for _ in range(600):
        node = rng.choice(nodes)
        tier = rng.choice([IndexTier.GPU, IndexTier.HOST, IndexTier.DISK])
        start = rng.randrange(40)
        chunk = prompt[start:start + rng.randrange(1, 12)]
        held = model.setdefault((node.name, tier), set())
        if rng.random() < 0.65:
            assert node.send(stored(tier, chunk)) is ApplyStatus.OK
            held.update(chunk)
        else:
            assert node.send(removed(tier, chunk)) is ApplyStatus.OK
            held.difference_update(chunk)
    settle()
    expected = {}
    for node in nodes:
        length = 0
        while length < 40 and any(prompt[length] in model.get((node.name, t), ()) for t in IndexTier):
            length += 1
        if length:
            expected[node.name] = length
    got = {s.node: s for s in index.score_keys(SPACE, prompt)}
    assert {name: s.blocks for name, s in got.items()} == expected
    for name, score in got.items():
        for run in score.runs:
            for block in range(run.start, run.start + run.blocks):
                best = min(t for t in IndexTier if prompt[block] in model.get((name, t), ()))
                assert best is run.tier


def test_engine_events_survive_the_daemons_reset_and_leave_with_the_node(index_factory: IndexFactory) -> None:
    index, settle = index_factory()
    prompt = keys(6)
    a = Node(index, "a")
    a.start(stored(IndexTier.HOST, prompt))
    index.apply_engine_events("a", [stored(IndexTier.GPU, prompt[:4], "vllm:tcp://127.0.0.1:5557")])
    a.start()  # the daemon restarted: its own tiers are gone, the engine's GPU blocks are not
    settle()
    [score] = index.score_keys(SPACE, prompt)
    assert score.runs == [TierRun(IndexTier.GPU, 0, 4)]
    index.apply_engine_events("a", [removed(IndexTier.GPU, prompt[2:4], "vllm:tcp://127.0.0.1:5557")])
    settle()
    assert index.score_keys(SPACE, prompt)[0].blocks == 2
