"""vLLM's own KV events into the index: decoded from the installed vllm's classes and from
llm-d's positional order, translated to kvtier keys, over real ZMQ with vLLM's own publisher."""

from __future__ import annotations

import time

import msgpack
import pytest

from kvtier.blocks.hashing import HashExtras, hash_prompt
from kvtier.errors import InvalidRequestError
from kvtier.events.model import BlockEvent, IndexTier, Op, Space, index_key
from kvtier.events.vllm_in import (
    EngineBlockRemoved,
    EngineBlockStored,
    EngineEventTranslator,
    EngineStream,
    VllmEventSubscriber,
    decode_vllm_batch,
)
from kvtier.index.memory import MemoryIndex
from kvtier.testing.daemon import free_port, wait_until

kv_events = pytest.importorskip("vllm.distributed.kv_events")
msgspec = pytest.importorskip("msgspec")

SPACE = Space("tiny", 16)
TOKENS = list(range(300, 300 + 16 * 5))
KEYS = [index_key(h) for h in hash_prompt(TOKENS, 16)]


def vllm_batch(*events) -> bytes:
    return msgspec.msgpack.Encoder().encode(kv_events.KVEventBatch(ts=time.time(), events=list(events)))


def stored(hashes, parent, tokens, medium="GPU", lora=None):
    return kv_events.BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=16, lora_id=None,
                                 medium=medium, lora_name=lora)


def test_events_vllm_encodes_decode_with_int_and_bytes_hashes() -> None:
    batch = decode_vllm_batch(vllm_batch(stored([11, 12], None, TOKENS[:32]), kv_events.BlockRemoved(block_hashes=[b"\x01" * 32], medium="GPU"),
                                         kv_events.AllBlocksCleared()))
    first, second, third = batch.events
    assert isinstance(first, EngineBlockStored) and first.block_hashes == [11, 12] and first.token_ids == TOKENS[:32]
    assert isinstance(second, EngineBlockRemoved) and second.block_hashes == [b"\x01" * 32]
    assert type(third).__name__ == "EngineAllBlocksCleared"


def test_llm_ds_positional_order_decodes_too() -> None:
    payload = msgpack.packb([1.5, [["BlockStored", [7], None, TOKENS[:16], 16, None, "CPU", None, None, 0],
                                   ["BlockRemoved", [7], "CPU"], ["SomethingNew", 1]]])
    batch = decode_vllm_batch(payload)
    assert batch.events[0].medium == "CPU" and batch.events[0].block_hashes == [7]
    assert batch.events[1].block_hashes == [7] and batch.skipped == 1


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb("text"), msgpack.packb([1.0, [["BlockStored", "nope"]]]),
                                     msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": ["x"],
                                                           "block_size": 16}]])])
def test_malformed_batches_are_refused(payload: bytes) -> None:
    with pytest.raises(InvalidRequestError):
        decode_vllm_batch(payload)


def translate(translator: EngineEventTranslator, *events) -> list[BlockEvent]:
    return translator.translate(decode_vllm_batch(vllm_batch(*events)))


def test_the_translator_recomputes_kvtiers_keys_and_counts_copies() -> None:
    translator = EngineEventTranslator(SPACE, "tcp://e:5557")
    [event] = translate(translator, stored([1, 2], None, TOKENS[:32]), stored([3], 2, TOKENS[32:48]))
    assert event.op is Op.STORED and event.tier is IndexTier.GPU and event.keys == KEYS[:3]
    assert event.source == "vllm:tcp://e:5557"
    assert translate(translator, stored([9], 12345, TOKENS[48:64])) == []  # unknown parent: dropped
    assert translator.stats.unknown_parent == 1
    assert translate(translator, stored([3], 2, TOKENS[32:48])) == []  # a second copy of block 3
    assert translate(translator, kv_events.BlockRemoved(block_hashes=[3], medium="GPU")) == []  # one copy left
    [gone] = translate(translator, kv_events.BlockRemoved(block_hashes=[3], medium="GPU"))
    assert gone.op is Op.REMOVED and gone.keys == [KEYS[2]]
    # kvtier's own tiers come from its daemons: the CPU/STORAGE events its connector adds are not taken
    assert translate(translator, stored([1], None, TOKENS[:16], medium="CPU")) == [] and translator.stats.other_tier == 1
    assert translate(translator, stored([1], None, TOKENS[:16], medium="TAPE")) == [] and translator.stats.unknown_medium == 1
    [cleared] = translate(translator, kv_events.AllBlocksCleared())
    assert cleared.op is Op.REMOVED and cleared.tier is IndexTier.GPU and sorted(cleared.keys) == sorted(KEYS[:2])


def test_a_stream_of_all_tiers_indexes_vllms_own_offloading() -> None:
    """A node offloading with vLLM's own connector (no kvtier daemon): its CPU blocks, with removals."""
    translator = EngineEventTranslator(SPACE, "e", EngineStream.parse("n=tcp://e:5557,tiers=all").tiers)
    [gpu] = translate(translator, stored([1, 2], None, TOKENS[:32]))
    [cpu] = translate(translator, stored([1], None, TOKENS[:16], medium="CPU"))
    assert gpu.tier is IndexTier.GPU and cpu.tier is IndexTier.HOST and cpu.keys == KEYS[:1]
    [gone] = translate(translator, kv_events.BlockRemoved(block_hashes=[1], medium="CPU"))
    assert gone.op is Op.REMOVED and gone.tier is IndexTier.HOST and gone.keys == KEYS[:1]
    cleared = translate(translator, stored([1], None, TOKENS[:16], medium="CPU"), kv_events.AllBlocksCleared())
    assert {(e.tier, tuple(sorted(e.keys))) for e in cleared if e.op is Op.REMOVED} == {
        (IndexTier.GPU, tuple(sorted(KEYS[:2]))), (IndexTier.HOST, (KEYS[0],))}


def test_lora_is_folded_in_and_unknown_extra_keys_are_not_guessed() -> None:
    translator = EngineEventTranslator(SPACE, "e")
    [event] = translate(translator, stored([1], None, TOKENS[:16], lora="adapter"))
    assert event.keys == [index_key(hash_prompt(TOKENS[:16], 16, HashExtras(lora_name="adapter"))[0])]
    odd = kv_events.BlockStored(block_hashes=[5], parent_block_hash=None, token_ids=TOKENS[:16], block_size=16, lora_id=None,
                                medium="GPU", lora_name=None, extra_keys=[("mm-hash", 0)])
    assert translate(translator, odd) == [] and translator.stats.unreproducible_extra_keys == 1


def test_streams_parse() -> None:
    stream = EngineStream.parse("node-a=tcp://10.0.0.1:5557,replay=tcp://10.0.0.1:5558,model=llama")
    assert (stream.node, stream.endpoint, stream.replay, stream.model) == ("node-a", "tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558", "llama")
    assert EngineStream.parse("tcp://h:1").node is None
    assert EngineStream.parse("tcp://h:1").tiers == {IndexTier.GPU}
    for bad in ("node=http://h:1", "n=tcp://h:1,tiers=cpu", "n=tcp://h:1,block_size=x", "n=tcp://h:1,colour=red"):
        with pytest.raises(InvalidRequestError):
            EngineStream.parse(bad)


def publisher(topic: str, replay: bool):
    port, replay_port = free_port(), free_port()
    pub = kv_events.ZmqEventPublisher(0, endpoint=f"tcp://*:{port}",  # vLLM binds a wildcard endpoint
                                      replay_endpoint=f"tcp://*:{replay_port}" if replay else None, topic=topic)
    return pub, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}"


def test_vllms_publisher_feeds_the_index_and_a_late_subscriber_replays_what_it_missed() -> None:
    pub, endpoint, replay = publisher("kv@node-a@tiny", replay=True)
    index = MemoryIndex()
    subscriber = None
    try:
        pub.publish(kv_events.KVEventBatch(ts=time.time(), events=[stored([1, 2], None, TOKENS[:32])]))  # seq 0, unheard
        time.sleep(0.3)
        subscriber = VllmEventSubscriber(EngineStream(endpoint.replace("*", "127.0.0.1"), replay=replay.replace("*", "127.0.0.1")),
                                         index.apply_engine_events)
        time.sleep(0.5)  # the subscription reaches the publisher
        pub.publish(kv_events.KVEventBatch(ts=time.time(), events=[stored([3], 2, TOKENS[32:48])]))  # seq 1: a child of seq 0's
        assert wait_until(lambda: [s.blocks for s in index.score_keys(SPACE, KEYS)] == [3], timeout=10)
        [score] = index.score_keys(SPACE, KEYS)
        assert score.node == "node-a" and score.runs[0].tier is IndexTier.GPU
        assert subscriber.stats["gaps"] == 1 and subscriber.stats["replayed"] == 1
    finally:
        if subscriber is not None:
            subscriber.close()
        pub.shutdown()


def test_a_gap_nobody_can_replay_clears_the_engines_blocks() -> None:
    """A publisher speaking vLLM's protocol that loses a batch (seq 1 never arrives), no replay socket."""
    import zmq

    port = free_port()
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    index = MemoryIndex()
    subscriber = VllmEventSubscriber(EngineStream(f"tcp://127.0.0.1:{port}"), index.apply_engine_events)

    def send(seq: int, *events) -> None:
        pub.send_multipart((b"kv@node-b@tiny", seq.to_bytes(8, "big"), vllm_batch(*events)))

    try:
        time.sleep(0.5)
        send(0, stored([1, 2], None, TOKENS[:32]))
        assert wait_until(lambda: [s.blocks for s in index.score_keys(SPACE, KEYS)] == [2], timeout=10)
        send(2, stored([7], None, TOKENS[:16]))  # seq 1 was lost: what the engine held is unknown now
        assert wait_until(lambda: subscriber.stats["gaps"] == 1, timeout=10)
        assert wait_until(lambda: [s.blocks for s in index.score_keys(SPACE, KEYS)] == [1], timeout=10)
    finally:
        subscriber.close()
        context.destroy(linger=0)


def test_engines_can_connect_to_an_index_that_binds() -> None:
    """llm-d's layout: the indexer listens, every engine's publisher connects to it."""
    port = free_port()
    index = MemoryIndex()
    subscriber = VllmEventSubscriber(EngineStream(f"tcp://*:{port}"), index.apply_engine_events)
    pub = kv_events.ZmqEventPublisher(0, endpoint=f"tcp://127.0.0.1:{port}", topic="kv@node-c@tiny")  # connects
    try:
        time.sleep(0.5)
        pub.publish(kv_events.KVEventBatch(ts=time.time(), events=[stored([1], None, TOKENS[:16])]))
        assert wait_until(lambda: [s.node for s in index.score_keys(SPACE, KEYS)] == ["node-c"], timeout=10)
    finally:
        pub.shutdown()
        subscriber.close()
