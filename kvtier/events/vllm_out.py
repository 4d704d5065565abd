"""The daemon's tiers as vLLM KV events, so routers built for vLLM's events (llm-d's indexer) see them.

Wire format, as vLLM's ``ZmqEventPublisher`` sends it (``vllm/distributed/kv_events.py``):

- ZMQ PUB frames ``(topic, seq as 8-byte big-endian, payload)``; the topic is
  ``kv@<node>@<model>``, one per model the daemon serves, each with its own ``seq`` from 0.
- ``payload`` is an ``EventBatch`` in msgpack, positional ``[ts, events]``. Events are
  ``BlockStored`` (``medium`` ``CPU`` for the host tier, ``STORAGE`` for disk and S3, with the
  block's token ids, block size, LoRA name and parent) and ``BlockRemoved`` (an eviction or a
  deletion from that tier). ``encoding="map"`` writes each event as a map with a ``"type"`` key
  (vLLM since PR #42892, the installed 0.32); ``"array"`` writes the older positional form with
  the tag first, in the field order llm-d decodes.
- Block hashes are the 64-bit index keys of kvtier's hashes (their first 8 bytes, big-endian), as
  vLLM sends int hashes by default; a consumer that recomputes its own keys from the token ids
  (llm-d, Dynamo) needs nothing else.
- Replay: a ROUTER socket answers ``[start seq (8 bytes)]`` (optionally followed by a topic
  frame, to ask for one topic) with every buffered ``(topic, seq, payload)`` from that seq on,
  then ``(b"", -1, b"")``, as vLLM's does.

Token ids are not part of a stored block. The connector describes the blocks it saves
(``DescribeBlocks``: hash, parent, token ids, LoRA) when the daemon asks for descriptions; a
block stored before its description arrives is announced when it does. Blocks with no
description (e.g. found on disk after a restart, before any engine saved them again) are
counted, not announced: kvtier's own index still has them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from kvtier.blocks.keys import BlockKey
from kvtier.chain.chain import TierChain
from kvtier.config import PublishConfig
from kvtier.errors import ConfigError
from kvtier.events.model import IndexTier, ServedLayout, index_key

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
_MEDIUM = {IndexTier.HOST: "CPU", IndexTier.DISK: "STORAGE", IndexTier.S3: "STORAGE"}
_MAX_WAITING = 65536


@dataclass(frozen=True, slots=True)
class BlockDescription:
    parent: bytes | None  # the previous block's kvtier hash; None for a prompt's first block
    token_ids: tuple[int, ...]
    lora_name: str | None


class BlockDescriptions:
    """What the connector told the daemon about its blocks, most recent ``capacity`` kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes, BlockDescription] = OrderedDict()
        self.on_new: Callable[[list[bytes]], None] | None = None

    def add(self, described: list[tuple[bytes, BlockDescription]]) -> None:
        with self._lock:
            for block_hash, description in described:
                self._items[block_hash] = description
                self._items.move_to_end(block_hash)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        if self.on_new is not None:
            self.on_new([block_hash for block_hash, _ in described])

    def get(self, block_hash: bytes) -> BlockDescription | None:
        with self._lock:
            return self._items.get(block_hash)


def stored_event(key: int, parent: int | None, description: BlockDescription, block_size: int, medium: str,
                 encoding: str) -> Any:
    fields = {"block_hashes": [key], "parent_block_hash": parent, "token_ids": list(description.token_ids),
              "block_size": block_size, "lora_id": None, "medium": medium, "lora_name": description.lora_name}
    if encoding == "map":
        return {"type": "BlockStored", **fields}
    # llm-d's positional order: tag, hashes, parent, tokens, block_size, lora_id, medium, lora_name
    return ["BlockStored", *fields.values()]


def removed_event(key: int, medium: str, encoding: str) -> Any:
    if encoding == "map":
        return {"type": "BlockRemoved", "block_hashes": [key], "medium": medium}
    return ["BlockRemoved", [key], medium]


def encode_batch(ts: float, events: list[Any]) -> bytes:
    return msgpack.packb([ts, events], use_bin_type=True)


class VllmEventPublisher:
    """Publishes the chain's changes as vLLM KV events on a ZMQ PUB socket (see the module docstring)."""

    def __init__(
        self,
        chain: TierChain,
        descriptions: BlockDescriptions,
        config: PublishConfig,
        *,
        node: str,
        layouts: Callable[[], list[ServedLayout]],
    ) -> None:
        import zmq

        if config.vllm_events is None:
            raise ConfigError("publish.vllm_events is not set")
        self.chain = chain
        self.descriptions = descriptions
        self.encoding = config.vllm_events_encoding
        self.node = node
        self._layouts = layouts
        self._tiers = [IndexTier.parse(tier.name) for tier in chain.tiers]
        self._changes: deque[tuple[bool, int, BlockKey]] = deque()
        self._waiting: OrderedDict[bytes, list[tuple[int, str]]] = OrderedDict()  # hash -> [(tier, layout)] stored, undescribed
        self._described: deque[list[bytes]] = deque()
        self._seq: dict[bytes, int] = {}
        self._buffer: deque[tuple[bytes, int, bytes]] = deque(maxlen=config.vllm_events_buffer)
        self.stats = {"batches": 0, "stored": 0, "removed": 0, "undescribed": 0, "replays": 0}
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        try:
            self._pub.bind(config.vllm_events)
            self._replay = None
            if config.vllm_events_replay:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(config.vllm_events_replay)
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise ConfigError(f"cannot bind the vLLM event sockets ({config.vllm_events}, {config.vllm_events_replay}): {exc}") from exc
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT) if self._replay is not None else None
        self._interval_s = config.interval_s
        self._stop = threading.Event()
        descriptions.on_new = self._described.append
        chain.watch(self._record)
        self._thread = threading.Thread(target=self._run, name="kvtier-vllm-events", daemon=True)
        self._thread.start()

    def _record(self, stored: bool, tier_index: int, key: BlockKey) -> None:  # under the chain's lock
        self._changes.append((stored, tier_index, key))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)

    # ---- the publisher's thread (the only one touching the sockets) --------------------------

    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                self._publish_pending()
                if self._replay is not None and dict(poller.poll(timeout=self._interval_s * 1000)):
                    self._serve_replay()
                elif self._replay is None:
                    self._stop.wait(self._interval_s)
            except Exception:  # never let one bad batch stop the stream
                log.exception("vLLM event publisher: a batch failed")
                self._stop.wait(self._interval_s)

    def _publish_pending(self) -> None:
        spaces = {layout.layout_id: layout for layout in self._layouts()}
        by_topic: dict[bytes, list[Any]] = {}
        while self._described:
            for block_hash in self._described.popleft():
                for tier, layout_id in self._waiting.pop(block_hash, ()):
                    self._add(by_topic, spaces, True, tier, layout_id, block_hash)
        for _ in range(len(self._changes)):
            stored, tier_index, key = self._changes.popleft()
            self._add(by_topic, spaces, stored, self._tiers[tier_index], key.layout_id, key.block_hash)
        now = time.time()
        for topic, events in by_topic.items():
            seq = self._seq.get(topic, 0)
            self._seq[topic] = seq + 1
            payload = encode_batch(now, events)
            self._pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
            self._buffer.append((topic, seq, payload))
            self.stats["batches"] += 1

    def _add(self, by_topic: dict[bytes, list[Any]], spaces: dict[str, ServedLayout], stored: bool, tier: IndexTier,
             layout_id: str, block_hash: bytes) -> None:
        layout = spaces.get(layout_id)
        medium = _MEDIUM.get(tier)
        if layout is None or medium is None:
            return
        topic = f"kv@{self.node}@{layout.model}".encode()
        if not stored:
            self._waiting.pop(block_hash, None)
            by_topic.setdefault(topic, []).append(removed_event(index_key(block_hash), medium, self.encoding))
            self.stats["removed"] += 1
            return
        description = self.descriptions.get(block_hash)
        if description is None or len(description.token_ids) != layout.block_size:
            self._waiting.setdefault(block_hash, []).append((tier, layout_id))
            if len(self._waiting) > _MAX_WAITING:
                self._waiting.popitem(last=False)
                self.stats["undescribed"] += 1
            return
        parent = index_key(description.parent) if description.parent is not None else None
        by_topic.setdefault(topic, []).append(
            stored_event(index_key(block_hash), parent, description, layout.block_size, medium, self.encoding))
        self.stats["stored"] += 1

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) not in (3, 4) or len(frames[2]) != 8:
            log.warning("vLLM event publisher: ignoring a malformed replay request (%d frames)", len(frames))
            return
        client, _, start = frames[:3]
        wanted = frames[3] if len(frames) == 4 else None
        first = int.from_bytes(start, "big")
        self.stats["replays"] += 1
        for topic, seq, payload in list(self._buffer):
            if seq >= first and (wanted is None or topic == wanted):
                self._replay.send_multipart((client, b"", topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))
