"""The daemon's index publisher: every block its tiers store and drop, in batches, plus a heartbeat.

The chain reports each change under its lock (:meth:`TierChain.watch`); the publisher only
appends it to a deque there. Its own thread drains the deque every ``interval_s``, groups
consecutive changes into :class:`BlockEvent` runs (order kept), and sends them to a *sink*: the
index service over gRPC, a Redis store, or the daemon's own in-memory index. Nothing a client
calls waits on the sink: a slow, dead or lying index only delays publishing.

Re-sync. The publisher starts with one and starts another whenever the sink answers RESYNC
(index or Redis restarted, a gap it saw), a new layout registers (its blocks could not be
named before), or the queue outgrows ``max_pending_keys`` during an outage. A re-sync opens a
new session: a ``reset`` batch, then the chain's whole catalogue in chunks, then the changes
queued since the snapshot, which were recorded from the moment the snapshot was taken. Events
are idempotent, so a change both in the snapshot and in the queue is harmless.

While the sink is unreachable the pending batch is kept and retried with back-off; heartbeats
stop, so the index drops the node after its TTL instead of trusting stale state.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from kvtier.blocks.keys import BlockKey
from kvtier.chain.chain import TierChain
from kvtier.config import PublishConfig
from kvtier.errors import KVTierError
from kvtier.events.model import (
    SHARED_TIERS,
    BlockEvent,
    IndexTier,
    NodeInfo,
    Op,
    PublishBatch,
    PublisherStatus,
    ServedLayout,
    Space,
)
from kvtier.index.base import ApplyStatus

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 5.0


class PublishSink(Protocol):
    """Where batches go: a :class:`~kvtier.index.base.KVIndex`, an index client, a Redis store."""

    def publish(self, batch: PublishBatch) -> ApplyStatus: ...

    def heartbeat(self, info: NodeInfo) -> ApplyStatus: ...


class IndexPublisher:
    def __init__(
        self,
        chain: TierChain,
        sink: PublishSink,
        config: PublishConfig,
        *,
        node: str,
        layouts: Callable[[], list[ServedLayout]],
        target: str = "",
        address: str = "",
        s3_location: str = "",
    ) -> None:
        self.chain = chain
        self.sink = sink
        self.config = config
        self.node = node
        self.target = target
        self.address = address
        self.s3_location = s3_location
        self._layouts = layouts
        self._tiers = [IndexTier.parse(tier.name) for tier in chain.tiers]
        self._changes: deque[tuple[bool, int, BlockKey]] = deque()
        self._resync_wanted = threading.Event()
        self._resync_wanted.set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._session = ""
        self._seq = 0
        self._unsent: PublishBatch | None = None  # built, not yet accepted
        self._publishing = False
        self._last_ok = 0.0
        self._last_beat = 0.0
        self._resyncs = 0
        self._last_error = ""
        self._failures = 0
        chain.watch(self._record)
        self._thread = threading.Thread(target=self._run, name="kvtier-publisher", daemon=True)
        self._thread.start()

    # ---- on the chain's lock -----------------------------------------------------------------

    def _record(self, stored: bool, tier_index: int, key: BlockKey) -> None:
        self._changes.append((stored, tier_index, key))

    # ---- control -----------------------------------------------------------------------------

    def request_resync(self) -> None:
        """Send the full state again under a new session (e.g. a new layout can now be named)."""
        self._resync_wanted.set()
        self._wake.set()

    def status(self) -> PublisherStatus:
        age = time.monotonic() - self._last_ok if self._last_ok else -1.0
        unsent = sum(len(e.keys) for e in self._unsent.events) if self._unsent else 0
        return PublisherStatus(self.target, self._publishing, self._session, self._seq, len(self._changes) + unsent, age,
                               self._resyncs, self._last_error)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every change recorded so far was accepted (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        while time.monotonic() < deadline:
            if not self._changes and self._unsent is None and not self._resync_wanted.is_set() and self._publishing:
                return True
            time.sleep(0.01)
        return False

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout_s)

    # ---- the publisher's thread --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
                self._failures = 0
                wait_s = self.config.interval_s
            except KVTierError as exc:
                self._note_failure(exc)
                wait_s = min(self.config.interval_s * 2 ** self._failures, _MAX_BACKOFF_S)
            except Exception as exc:  # the publisher outlives any one failure; the index re-syncs
                log.exception("index publisher: unexpected failure; re-syncing")
                self._note_failure(exc)
                self._resync_wanted.set()
                wait_s = _MAX_BACKOFF_S
            self._wake.wait(wait_s)
            self._wake.clear()

    def _note_failure(self, exc: Exception) -> None:
        if self._publishing or not self._last_error:
            log.warning("index publisher: %s unreachable (%s); blocks queue until it answers", self.target or "index", exc)
        self._publishing = False
        self._last_error = str(exc)
        self._failures += 1

    def _step(self) -> None:
        if len(self._changes) > self.config.max_pending_keys:
            log.warning("index publisher: %d changes queued; dropping them for a full re-sync", len(self._changes))
            self._resync_wanted.set()
        if self._resync_wanted.is_set():
            self._resync()
        if self._unsent is None and self._changes:
            self._unsent = self._next_batch(self._drain())
        while self._unsent is not None:
            self._send(self._unsent)
            if self._resync_wanted.is_set():
                return
            self._unsent = self._next_batch(self._drain()) if self._changes else None
        if time.monotonic() - self._last_beat >= self.config.heartbeat_s:
            self._beat()

    def _send(self, batch: PublishBatch) -> None:
        if self.sink.publish(batch) is ApplyStatus.RESYNC:
            log.info("index publisher: the index asks for a re-sync (it restarted or lost batches)")
            self._resync_wanted.set()
            self._unsent = None
            return
        self._ok()
        self._unsent = None

    def _ok(self) -> None:
        if not self._publishing:
            log.info("index publisher: publishing to %s", self.target or "the index")
        self._publishing = True
        self._last_ok = time.monotonic()
        self._last_error = ""

    def _beat(self) -> None:
        stats = self.chain.stats()
        info = NodeInfo(self.node, self._session, self._seq, self.address, self.s3_location, self._layouts(),
                        {tier.name: tier.blocks for tier in stats.tiers}, len(self._changes))
        if self.sink.heartbeat(info) is ApplyStatus.RESYNC:
            self._resync_wanted.set()
            return
        self._last_beat = time.monotonic()
        self._ok()

    def _resync(self) -> None:
        """A new session: reset, the whole catalogue, then what changed since."""
        self._resync_wanted.clear()
        self._unsent = None
        self._session, self._seq = uuid.uuid4().hex, 0
        self._resyncs += 1
        keys = self.chain.snapshot_keys(self._changes.clear)
        chunk = self.config.max_batch_keys
        first = True
        for start in range(0, max(len(keys), 1), chunk):
            part = keys[start:start + chunk]
            changes = [(True, index, key) for key, tiers in zip(part, self.chain.tiers_of(part), strict=True)
                       for index in _bits(tiers)]
            batch = self._next_batch(changes, reset=first)
            first = False
            self._unsent = batch
            self._send(batch)
            if self._resync_wanted.is_set():
                return  # the index restarted again meanwhile: start over next step
        self._beat()
        log.info("index publisher: re-synced %d blocks (session %s)", len(keys), self._session[:8])

    def _drain(self) -> list[tuple[bool, int, BlockKey]]:
        changes = []
        budget = self.config.max_batch_keys
        pop = self._changes.popleft
        while budget and self._changes:
            changes.append(pop())
            budget -= 1
        return changes

    def _next_batch(self, changes: list[tuple[bool, int, BlockKey]], *, reset: bool = False) -> PublishBatch:
        self._seq += 1
        return PublishBatch(self.node, self._session, self._seq, reset, list(self._events(changes)))

    def _events(self, changes: list[tuple[bool, int, BlockKey]]) -> Iterator[BlockEvent]:
        """Consecutive changes of one (op, tier, layout) as one event each, in order."""
        spaces = {layout.layout_id: Space(layout.model, layout.block_size) for layout in self._layouts()}
        unknown: set[str] = set()
        current: BlockEvent | None = None
        current_group: tuple[bool, int, str] | None = None
        for stored, tier_index, key in changes:
            group = (stored, tier_index, key.layout_id)
            if group != current_group:
                if current is not None:
                    yield current
                current, current_group = None, group
                space = spaces.get(key.layout_id)
                if space is None:
                    unknown.add(key.layout_id)  # blocks from before a restart; named once their layout registers
                    continue
                tier = self._tiers[tier_index]
                source = f"{self.s3_location}/{key.layout_id}" if tier in SHARED_TIERS else key.layout_id
                current = BlockEvent(Op.STORED if stored else Op.REMOVED, tier, space, source, [])
            if current is not None:
                current.keys.append(int.from_bytes(key.block_hash[:8], "big"))
        if current is not None:
            yield current
        if unknown:
            log.debug("index publisher: %d layouts not registered yet; their blocks wait for it", len(unknown))


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def served_layouts(core_layouts: Callable[[], list]) -> Callable[[], list[ServedLayout]]:
    """Adapt the daemon's registered :class:`KVLayout` objects to what heartbeats carry."""

    def layouts() -> list[ServedLayout]:
        return [ServedLayout(lay.layout_id, lay.model, lay.block_size, lay.tp_rank, lay.tp_size) for lay in core_layouts()]

    return layouts
