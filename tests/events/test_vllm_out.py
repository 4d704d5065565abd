"""The daemon's tiers as vLLM KV events: decoded by the installed vllm's own classes and by a
positional decoder in llm-d's field order, over real ZMQ sockets, from a real daemon process."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest

from kvtier.blocks.hashing import hash_prompt
from kvtier.blocks.layout import KVLayout
from kvtier.events.model import index_key
from kvtier.testing.daemon import LocalDaemon, free_port

zmq = pytest.importorskip("zmq")

pytestmark = pytest.mark.slow

LAYOUT = KVLayout(model="test/tiny", dtype="float16", num_layers=2, num_kv_heads=2, head_size=64, block_size=16)  # 8 KiB blocks
TOKENS = list(range(5000, 5000 + 16 * 6))
HASHES = hash_prompt(TOKENS, 16)


def start_daemon(tmp_path: Path, encoding: str) -> tuple[LocalDaemon, str, str]:
    pub, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = LocalDaemon(tmp_path / "d", host_capacity="16MiB", args=["--node-name", "node-a"],
                         env={"KVTIER_PUBLISH_VLLM_EVENTS": pub, "KVTIER_PUBLISH_VLLM_EVENTS_REPLAY": replay,
                              "KVTIER_PUBLISH_VLLM_EVENTS_ENCODING": encoding, "KVTIER_PUBLISH_INTERVAL_S": "0.02"})
    daemon.start()
    return daemon, pub, replay


def subscribe(endpoint: str):
    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@node-a@test/tiny")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(endpoint)
    time.sleep(0.3)  # PUB/SUB: let the subscription reach the publisher
    return sub


def receive(sub, timeout_s: float = 10.0) -> list[tuple[bytes, int, bytes]]:
    frames, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sub.poll(200):
            topic, seq, payload = sub.recv_multipart()
            frames.append((topic, int.from_bytes(seq, "big"), payload))
        elif frames:
            break
    return frames


def save_described(daemon: LocalDaemon, hashes: list[bytes]) -> None:
    with daemon.client() as client:
        registered = client.register_layout(LAYOUT)
        assert registered.wants_block_descriptions
        client.describe_blocks([(h, HASHES[i - 1] if i else None, TOKENS[i * 16:(i + 1) * 16], None)
                                for i, h in enumerate(HASHES) if h in hashes])
        client.write_blocks(registered.layout_id, {h: bytes(LAYOUT.block_nbytes) for h in hashes})


def test_vllms_own_classes_decode_the_daemons_events(tmp_path: Path) -> None:
    msgspec = pytest.importorskip("msgspec")
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    daemon, pub, replay = start_daemon(tmp_path, "map")
    try:
        sub = subscribe(pub)
        save_described(daemon, HASHES)
        frames = receive(sub)
        assert frames and frames[0][0] == b"kv@node-a@test/tiny"
        assert [seq for _, seq, _ in frames] == list(range(len(frames)))
        decoder = msgspec.msgpack.Decoder(type=kv_events.KVEventBatch)
        events = [event for _, _, payload in frames for event in decoder.decode(payload).events]
        cpu = [e for e in events if isinstance(e, kv_events.BlockStored) and e.medium == kv_events.MEDIUM_CPU]
        assert [e.block_hashes[0] for e in cpu] == [index_key(h) for h in HASHES]
        assert [e.parent_block_hash for e in cpu] == [None] + [index_key(h) for h in HASHES[:-1]]
        assert [e.token_ids for e in cpu] == [TOKENS[i * 16:(i + 1) * 16] for i in range(len(HASHES))]
        assert all(e.block_size == 16 for e in cpu)
        storage = [e for e in events if isinstance(e, kv_events.BlockStored) and e.medium == kv_events.MEDIUM_STORAGE]
        if not storage:  # written back to disk in the background: wait for those events
            more = receive(sub)
            storage = [e for _, _, p in more for e in decoder.decode(p).events if e.medium == kv_events.MEDIUM_STORAGE]
        assert {e.block_hashes[0] for e in storage} == {index_key(h) for h in HASHES}
        # a replay from seq 0 gives every batch again, then the end marker
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(replay)
        dealer.send_multipart((b"", (0).to_bytes(8, "big")))
        replayed = []
        while dealer.poll(5000):
            _, _topic, seq, _payload = dealer.recv_multipart()
            if seq == (-1).to_bytes(8, "big", signed=True):
                break
            replayed.append(int.from_bytes(seq, "big"))
        assert replayed[: len(frames)] == [seq for _, seq, _ in frames]
        dealer.close()
        sub.close()
    finally:
        daemon.stop()


def decode_positional(payload: bytes) -> list[list]:
    """llm-d's positional order: BlockStored [tag, hashes, parent, token_ids, block_size, lora_id, medium,
    lora_name, ...]; BlockRemoved [tag, hashes, medium, ...]."""
    ts, events = msgpack.unpackb(payload)[:2]
    assert isinstance(ts, float)
    return events


def test_the_positional_encoding_follows_llm_ds_field_order_and_reports_evictions(tmp_path: Path) -> None:
    daemon, pub, _ = start_daemon(tmp_path, "array")
    try:
        sub = subscribe(pub)
        save_described(daemon, HASHES[:3])
        events = [e for _, _, payload in receive(sub) for e in decode_positional(payload)]
        stored = [e for e in events if e[0] == "BlockStored" and e[6] == "CPU"]
        assert [(e[1], e[2], e[3], e[4]) for e in stored] == [
            ([index_key(HASHES[i])], index_key(HASHES[i - 1]) if i else None, TOKENS[i * 16:(i + 1) * 16], 16) for i in range(3)
        ]
        # fill host memory (16 MiB arena, 8 KiB blocks) so the first blocks are evicted from it
        filler = hash_prompt(list(range(100_000, 100_000 + 16 * 2100)), 16)
        with daemon.client() as client:
            layout_id = client.register_layout(LAYOUT).layout_id
            for start in range(0, len(filler), 300):
                client.write_blocks(layout_id, {h: bytes(LAYOUT.block_nbytes) for h in filler[start:start + 300]})
        removed = [e for _, _, payload in receive(sub, 20) for e in decode_positional(payload) if e[0] == "BlockRemoved"]
        assert {index_key(HASHES[0])} <= {key for e in removed if e[2] == "CPU" for key in e[1]}
        sub.close()
    finally:
        daemon.stop()
