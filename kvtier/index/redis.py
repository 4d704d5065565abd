"""A Redis-backed index replica: writes go to the shared store, queries to an in-memory view.

Several replicas on one Redis serve at once and agree. Each keeps a :class:`MemoryIndex` view
(queries never make a Redis round trip) built by a background thread:

1. note the log's last id and the epoch, 2. load the snapshot (every node's record and last
heartbeat, every source set, SSCAN in pages), 3. tail the log from the noted id with ``XREAD
BLOCK``. Entries already reflected in the snapshot are applied again harmlessly: events are
idempotent and batches carry absolute state changes.

The view is rebuilt from scratch when the epoch changes (Redis restarted empty, or was flushed)
or when the log was trimmed past what the view applied (the replica fell too far behind). While
Redis is unreachable the view keeps answering with what it has, and the thread retries with
back-off, logging once per outage. Each replica also purges nodes silent for longer than the TTL
(an atomic script that checks Redis's own clock, so two replicas doing it is harmless).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvtier.errors import InvalidRequestError, KVTierError
from kvtier.events.model import INDEX_KEY_BYTES, BlockEvent, IndexTier, NodeInfo, Op, PublishBatch, Space, is_engine_source
from kvtier.events.wire import decode_batch, decode_heartbeat, unpack_keys
from kvtier.index.base import ApplyStatus, Holding, KVIndex, NodeScore, NodeStatus
from kvtier.index.memory import MemoryIndex
from kvtier.index.redis_store import (
    RedisStore,
    epoch_key,
    log_key,
    members_key,
    node_key,
    nodes_key,
    owned_key,
    redis_client,
    shared_key,
    source_key_fields,
    unavailable,
)
from kvtier.index.walk import Blocks

log = logging.getLogger(__name__)

_BLOCK_MS = 500
_MAX_BACKOFF_S = 5.0
_SCAN_PAGE = 10_000


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class RedisIndex(KVIndex):
    def __init__(self, client: Any, *, namespace: str = "kvtier", heartbeat_ttl_s: float = 15.0,
                 weights: dict[IndexTier, float] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.store = RedisStore(client, namespace)
        self.prefix = self.store.prefix
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._new_view = lambda: MemoryIndex(heartbeat_ttl_s=heartbeat_ttl_s, weights=weights, clock=clock, check_sessions=False)
        self.view = self._new_view()  # replaced whole by a rebuild, so queries never see a half-built one
        self._epoch: bytes | None = None
        self._applied = (0, 0)  # the last log id the view has applied
        self._built = threading.Event()
        self._stop = threading.Event()
        self._down = False
        self._next_sweep = 0.0
        self.stats = {"rebuilds": 0, "entries": 0, "bad_entries": 0, "purged": 0}
        self._thread = threading.Thread(target=self._run, name="kvtier-index-replica", daemon=True)
        self._thread.start()

    @classmethod
    def from_url(cls, url: str, *, password_file: Path | None = None, tls_ca_file: Path | None = None, namespace: str = "kvtier",
                 heartbeat_ttl_s: float = 15.0, weights: dict[IndexTier, float] | None = None) -> RedisIndex:
        client = redis_client(url, password_file=password_file, tls_ca_file=tls_ca_file)
        return cls(client, namespace=namespace, heartbeat_ttl_s=heartbeat_ttl_s, weights=weights)

    # ---- writes go to Redis ------------------------------------------------------------------

    def publish(self, batch: PublishBatch) -> ApplyStatus:
        _check_names(batch.events)
        return self.store.publish(batch)

    def heartbeat(self, info: NodeInfo) -> ApplyStatus:
        return self.store.heartbeat(info)

    def apply_engine_events(self, node: str, events: list[BlockEvent]) -> None:
        _check_names(events)
        for event in events:
            if not is_engine_source(event.source):
                raise InvalidRequestError(f"engine events come from sources named vllm:..., got {event.source!r}")
        self.store.apply_engine_events(node, PublishBatch(node, "engine", 0, False, events))

    # ---- queries come from the view ----------------------------------------------------------

    def score_blocks(self, space: Space, blocks: Blocks, candidates: Sequence[str] | None = None) -> list[NodeScore]:
        return self.view.score_blocks(space, blocks, candidates)

    def lookup(self, space: Space, keys: Sequence[int]) -> list[list[Holding]]:
        return self.view.lookup(space, keys)

    def nodes(self) -> list[NodeStatus]:
        return self.view.nodes()

    def spaces(self) -> list[Space]:
        return self.view.spaces()

    def wait_synced(self, timeout_s: float = 10.0) -> bool:
        """Wait until the view has applied everything the log held when this was called."""
        deadline = time.monotonic() + timeout_s
        target = None
        while time.monotonic() < deadline:
            try:
                if target is None:
                    last = self.client.xrevrange(log_key(self.prefix), count=1)
                    target = _stream_id(last[0][0]) if last else (0, 0)
                if self._built.is_set() and self._applied >= target:
                    return True
            except Exception as exc:  # noqa: BLE001 - Redis down: not synced, keep polling until the deadline
                log.debug("wait_synced: %s", exc)
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.store.close()

    # ---- the replica's thread ----------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                epoch = self.client.get(epoch_key(self.prefix))
                if not self._built.is_set() or epoch != self._epoch:
                    self._rebuild()
                self._tail()
                self._sweep()
                if self._down:
                    log.info("index replica: Redis answers again")
                self._down, failures = False, 0
            except KVTierError as exc:
                self._note_down(exc)
                failures += 1
            except Exception as exc:  # noqa: BLE001 - redis-py raises many types; the thread must live on
                self._note_down(exc)
                failures += 1
            if failures:
                self._stop.wait(min(0.05 * 2 ** failures, _MAX_BACKOFF_S))

    def _note_down(self, exc: Exception) -> None:
        if not self._down:
            log.warning("index replica: Redis unreachable (%s); answering from the last view", exc)
        self._down = True

    def _rebuild(self) -> None:
        """The view from a snapshot, then the log from the id noted before it."""
        client, prefix = self.client, self.prefix
        # The epoch is made here if the store has none, so the first write into an empty namespace
        # does not change it and look like a flushed Redis (which rebuilds past unread log entries).
        client.set(epoch_key(prefix), uuid.uuid4().hex, nx=True)
        last = client.xrevrange(log_key(prefix), count=1)
        start = _stream_id(last[0][0]) if last else (0, 0)
        epoch = client.get(epoch_key(prefix))
        view = self._new_view()
        redis_now_ms = _redis_ms(client)
        heartbeats = client.hgetall(nodes_key(prefix))
        for node_raw in client.smembers(members_key(prefix)):
            node = node_raw.decode()
            session, seq, seen = client.hmget(node_key(prefix, node), "session", "seq", "seen")
            age_s = (redis_now_ms - int(seen)) / 1000 if seen else self.heartbeat_ttl_s + 1
            view.publish(PublishBatch(node, (session or b"?").decode(), int(seq or 0), True, []))
            payload = heartbeats.get(node_raw)
            try:
                info = decode_heartbeat(payload) if payload else NodeInfo(node, (session or b"?").decode(), int(seq or 0))
            except InvalidRequestError as exc:
                log.warning("index replica: node %s's heartbeat is unreadable (%s)", node, exc)
                info = NodeInfo(node, (session or b"?").decode(), int(seq or 0))
            view.heartbeat(info, age_s=age_s)
            for key in client.smembers(owned_key(prefix, node)):
                view.load(node, [self._source_event(key)])
        for key in client.smembers(shared_key(prefix)):
            view.load("", [self._source_event(key)])
        self.view, self._epoch, self._applied = view, epoch, start
        self._built.set()
        self.stats["rebuilds"] += 1

    def _source_event(self, key: bytes) -> BlockEvent:
        _holder, model, block_size, source, tier = source_key_fields(self.prefix, key)
        members: list[int] = []
        cursor = 0
        while True:  # pages of members, each unpacked in one call
            cursor, page = self.client.sscan(key, cursor, count=_SCAN_PAGE)
            if page and set(map(len, page)) != {INDEX_KEY_BYTES}:
                raise InvalidRequestError(f"{key!r} holds a member that is not an {INDEX_KEY_BYTES}-byte index key")
            members.extend(unpack_keys(b"".join(page)))
            if not int(cursor):
                break
        return BlockEvent(Op.STORED, IndexTier(tier), Space(model, block_size), source, members)

    def _tail(self) -> None:
        stream = log_key(self.prefix)
        after = f"{self._applied[0]}-{self._applied[1]}"
        first = self.client.xrange(stream, count=1)
        if first and self._applied != (0, 0) and _stream_id(first[0][0]) > self._applied:
            log.warning("index replica: the log was trimmed past what this replica applied; rebuilding the view")
            self._built.clear()
            return
        replies = self.client.xread({stream: after}, count=1000, block=_BLOCK_MS)
        for _, entries in replies or ():
            for entry_id, fields in entries:
                self._apply_entry(fields)
                self._applied = _stream_id(entry_id)
                self.stats["entries"] += 1

    def _apply_entry(self, fields: dict[bytes, bytes]) -> None:
        kind, payload = fields.get(b"k"), fields.get(b"d", b"")
        try:
            if kind == b"b":
                self.view.publish(decode_batch(payload))
            elif kind == b"h":
                self.view.heartbeat(decode_heartbeat(payload))
            elif kind == b"e":
                batch = decode_batch(payload)
                self.view.apply_engine_events(batch.node, batch.events)
            elif kind == b"p":
                self.view.forget(payload.decode())
            else:
                raise InvalidRequestError(f"unknown log entry kind {kind!r}")
        except (InvalidRequestError, UnicodeDecodeError) as exc:
            self.stats["bad_entries"] += 1
            log.warning("index replica: skipping a malformed log entry (%s)", exc)

    def _sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + max(self.heartbeat_ttl_s / 4, 0.05)
        for node in self.view.expired():
            if self.store.purge_if_silent(node, self.heartbeat_ttl_s):
                self.stats["purged"] += 1
        self.view.expire()


def _redis_ms(client: Any) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _check_names(events: list[BlockEvent]) -> None:
    for event in events:
        if "|" in event.space.model or "|" in event.source:
            raise InvalidRequestError("model and source names may not contain '|' (the Redis store's key separator)")


__all__ = ["RedisIndex", "RedisStore", "unavailable"]
