"""The in-memory index: the embedded default, and the view every Redis-backed replica queries.

Layout in memory. Every holder (a node, or a shared S3 location) gets a slot ``0..width-1``. Per
space, ``blocks`` maps an index key to one int with bit ``tier * width + slot`` set for every
holder that holds the key in that tier (about 130 bytes a key with the dict entry). A holder
holding a key in one tier through several sources (tensor-parallel ranks, engines) counts the
extra sources in ``_extra``, so the bit clears only with the last. Each holder keeps the set of
keys per ``(space, source, tier)``, which makes events idempotent and a reset or purge exact.

Scoring walks the prompt's keys once and stops at the first key no live candidate holds. Work
per block is a dict lookup and a few integer operations; the per-tier split is recomputed only
where the holder bits change from one block to the next, which is rare along a prefix.

Thread safety: one lock; writers hold it per batch, queries hold it for one walk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kvtier.errors import InvalidRequestError
from kvtier.events.model import (
    ENGINE_SOURCE_PREFIX,
    SHARED_TIERS,
    BlockEvent,
    IndexTier,
    NodeInfo,
    Op,
    PublishBatch,
    Space,
    is_engine_source,
)
from kvtier.index.base import DEFAULT_TIER_WEIGHTS, ApplyStatus, Holding, KVIndex, NodeScore, NodeStatus, TierRun

_TIERS = tuple(IndexTier)
_INITIAL_WIDTH = 64

SourceKey = tuple[Space, str, IndexTier]


def shared_holder_of(source: str) -> str:
    """The location of a shared-tier source ``"<location>/<layout_id>"`` (e.g. ``s3://bucket/prefix``)."""
    location, sep, layout = source.rpartition("/")
    if not sep or not location or not layout:
        raise InvalidRequestError(f"a shared-tier source is '<location>/<layout_id>', got {source!r}")
    return location


@dataclass(slots=True)
class _Holder:
    name: str
    slot: int
    sources: dict[SourceKey, set[int]] = field(default_factory=dict)


@dataclass(slots=True)
class _Node:
    info: NodeInfo
    last_seen: float


class MemoryIndex(KVIndex):
    def __init__(
        self,
        *,
        heartbeat_ttl_s: float = 15.0,
        weights: dict[IndexTier, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        check_sessions: bool = True,
    ) -> None:
        """``check_sessions=False`` applies batches without the session/seq check (a Redis
        replica's view: the store checked them before they reached the log)."""
        if heartbeat_ttl_s <= 0:
            raise InvalidRequestError("heartbeat_ttl_s must be positive")
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.weights = {**DEFAULT_TIER_WEIGHTS, **(weights or {})}
        self._clock = clock
        self._check_sessions = check_sessions
        self._lock = threading.RLock()
        self._width = _INITIAL_WIDTH
        self._holders: dict[str, _Holder] = {}
        self._slot_names: list[str | None] = []
        self._free_slots: list[int] = []
        self._blocks: dict[Space, dict[int, int]] = {}
        self._extra: dict[tuple[Space, int, int], int] = {}  # (space, key, bit position) -> sources beyond the first
        self._nodes: dict[str, _Node] = {}
        self._alive_cache: tuple[float, int, dict[int, int]] | None = None  # (valid until, node mask, location -> nodes)

    # ---- writes ------------------------------------------------------------------------------

    def publish(self, batch: PublishBatch) -> ApplyStatus:
        with self._lock:
            node = self._nodes.get(batch.node)
            if self._check_sessions and not batch.reset:
                if node is None or node.info.session != batch.session or batch.seq != node.info.seq + 1:
                    return ApplyStatus.RESYNC
            if batch.reset:
                self._drop_sources(batch.node, keep=is_engine_source)
            if node is None:
                node = self._nodes[batch.node] = _Node(NodeInfo(batch.node, batch.session, batch.seq), self._clock())
            node.info.session, node.info.seq = batch.session, batch.seq
            node.last_seen = self._clock()
            for event in batch.events:
                self._apply(batch.node, event)
            self._alive_cache = None
            return ApplyStatus.OK

    def apply_engine_events(self, node: str, events: list[BlockEvent]) -> None:
        with self._lock:
            for event in events:
                if not is_engine_source(event.source):
                    raise InvalidRequestError(f"engine events come from sources named {ENGINE_SOURCE_PREFIX}..., got {event.source!r}")
                self._apply(node, event)

    def heartbeat(self, info: NodeInfo) -> ApplyStatus:
        with self._lock:
            node = self._nodes.get(info.node)
            if self._check_sessions and (node is None or node.info.session != info.session or node.info.seq != info.seq):
                return ApplyStatus.RESYNC
            if node is None:
                node = self._nodes[info.node] = _Node(info, self._clock())
            node.info, node.last_seen = info, self._clock()
            self._alive_cache = None
            return ApplyStatus.OK

    def _apply(self, node: str, event: BlockEvent) -> None:
        name = shared_holder_of(event.source) if event.tier in SHARED_TIERS else node
        holder = self._holder(name)
        source_key = (event.space, event.source, event.tier)
        position = event.tier * self._width + holder.slot
        if event.op is Op.STORED:
            held = holder.sources.setdefault(source_key, set())
            self._add(event.space, held, event.keys, position)
        elif event.tier in SHARED_TIERS:  # gone from the bucket: gone for every node that reads it
            for other_key, held in list(holder.sources.items()):
                if other_key[0] == event.space and other_key[2] == event.tier:
                    self._remove(event.space, held, event.keys, position)
        else:
            held = holder.sources.get(source_key)
            if held is not None:
                self._remove(event.space, held, event.keys, position)

    def _add(self, space: Space, held: set[int], keys: Iterable[int], position: int) -> None:
        blocks = self._blocks.setdefault(space, {})
        bit = 1 << position
        extra = self._extra
        for key in keys:
            if key in held:
                continue
            held.add(key)
            mask = blocks.get(key, 0)
            if mask & bit:
                extra_key = (space, key, position)
                extra[extra_key] = extra.get(extra_key, 0) + 1
            else:
                blocks[key] = mask | bit

    def _remove(self, space: Space, held: set[int], keys: Iterable[int], position: int) -> None:
        blocks = self._blocks.get(space, {})
        clear = ~(1 << position)
        extra = self._extra
        for key in keys:
            if key not in held:
                continue
            held.discard(key)
            extra_key = (space, key, position)
            count = extra.get(extra_key)
            if count:
                if count == 1:
                    del extra[extra_key]
                else:
                    extra[extra_key] = count - 1
                continue
            mask = blocks.get(key, 0) & clear
            if mask:
                blocks[key] = mask
            else:
                blocks.pop(key, None)

    def _holder(self, name: str) -> _Holder:
        holder = self._holders.get(name)
        if holder is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self._slot_names[slot] = name
            else:
                slot = len(self._slot_names)
                if slot >= self._width:
                    self._widen(2 * self._width)
                self._slot_names.append(name)
            holder = self._holders[name] = _Holder(name, slot)
        return holder

    def _widen(self, width: int) -> None:
        """Re-encode every mask for ``width`` slots per tier (when holders outnumber slots)."""
        old = self._width
        old_full = (1 << old) - 1
        for blocks in self._blocks.values():
            for key, mask in blocks.items():
                blocks[key] = sum(((mask >> (t * old)) & old_full) << (t * width) for t in range(len(_TIERS)))
        self._extra = {
            (space, key, (position // old) * width + position % old): count
            for (space, key, position), count in self._extra.items()
        }
        self._width = width

    def _drop_sources(self, name: str, keep: Callable[[str], bool]) -> None:
        """Forget what ``name`` holds through every source but those ``keep`` names."""
        holder = self._holders.get(name)
        for source_key, held in list(holder.sources.items()) if holder else ():
            space, source, tier = source_key
            if not keep(source):
                self._remove(space, held, list(held), tier * self._width + holder.slot)
                del holder.sources[source_key]

    def _drop_holder(self, name: str) -> None:
        """Forget everything ``name`` holds and free its slot."""
        self._drop_sources(name, keep=lambda source: False)
        holder = self._holders.pop(name, None)
        if holder is None:
            return
        self._slot_names[holder.slot] = None
        self._free_slots.append(holder.slot)

    def expire(self) -> list[str]:
        """Purge the holdings of nodes past their TTL (their shared tiers stay); return their names."""
        with self._lock:
            now = self._clock()
            dead = [name for name, node in self._nodes.items() if now - node.last_seen > self.heartbeat_ttl_s]
            for name in dead:
                self._drop_holder(name)
                del self._nodes[name]
            self._drop_orphan_locations()
            self._alive_cache = None
            return dead

    def _drop_orphan_locations(self) -> None:
        """A shared location stays as long as its holdings do; an empty one frees its slot."""
        for name, holder in list(self._holders.items()):
            if name not in self._nodes and not any(holder.sources.values()):
                self._drop_holder(name)

    def clear(self) -> None:
        """Forget everything (a replica rebuilding its view)."""
        with self._lock:
            self._holders.clear()
            self._slot_names.clear()
            self._free_slots.clear()
            self._blocks.clear()
            self._extra.clear()
            self._nodes.clear()
            self._width = _INITIAL_WIDTH
            self._alive_cache = None

    # ---- queries -----------------------------------------------------------------------------

    def _alive(self) -> tuple[int, dict[int, int]]:
        """The slots of live nodes, and per shared location slot the live nodes that read it."""
        now = self._clock()
        cache = self._alive_cache
        if cache is not None and now < cache[0]:
            return cache[1], cache[2]
        mask, readers, until = 0, {}, now + self.heartbeat_ttl_s
        for name, node in self._nodes.items():
            age = now - node.last_seen
            if age > self.heartbeat_ttl_s or name not in self._holders and not node.info.s3_location:
                continue
            until = min(until, node.last_seen + self.heartbeat_ttl_s)
            holder = self._holder(name)
            mask |= 1 << holder.slot
            location = self._holders.get(node.info.s3_location) if node.info.s3_location else None
            if location is not None:
                readers[location.slot] = readers.get(location.slot, 0) | 1 << holder.slot
        self._alive_cache = (until, mask, readers)
        return mask, readers

    def score_keys(self, space: Space, keys: Sequence[int], candidates: Sequence[str] | None = None) -> list[NodeScore]:
        with self._lock:
            blocks = self._blocks.get(space)
            if not blocks or not keys:
                return []
            alive, readers = self._alive()
            if candidates is not None:
                wanted = 0
                for name in candidates:
                    holder = self._holders.get(name)
                    if holder is not None:
                        wanted |= 1 << holder.slot
                alive &= wanted
            width, full = self._width, (1 << self._width) - 1
            get = blocks.get
            changes: list[tuple[int, tuple[int, int, int, int]]] = []  # (block, best-tier masks) where they change
            ends: dict[int, int] = {}  # slot -> prefix length, for slots that dropped out
            previous_mask, tiers_now = -1, (0, 0, 0, 0)
            held_now = 0
            index = 0
            for index, key in enumerate(keys):  # noqa: B007 - index is used after the loop
                mask = get(key)
                if mask is None:
                    break
                if mask != previous_mask:
                    previous_mask = mask
                    gpu, host, disk, shared = mask & full, (mask >> width) & full, (mask >> 2 * width) & full, mask >> 3 * width
                    s3 = 0
                    while shared:
                        low = shared & -shared
                        s3 |= readers.get(low.bit_length() - 1, 0)
                        shared ^= low
                    host &= ~gpu
                    disk &= ~(gpu | host)
                    s3 &= ~(gpu | host | disk)
                    tiers_now = (gpu, host, disk, s3)
                    held_now = gpu | host | disk | s3
                still = held_now & alive
                if still != alive:
                    gone = alive & ~still
                    while gone:
                        low = gone & -gone
                        ends[low.bit_length() - 1] = index
                        gone ^= low
                    alive = still
                    if not alive:
                        break
                if not changes or changes[-1][1] != tiers_now:
                    changes.append((index, tiers_now))
            else:
                index = len(keys)
            while alive:  # held the whole prompt
                low = alive & -alive
                ends[low.bit_length() - 1] = index
                alive ^= low
            return self._scores(space, ends, changes)

    def _scores(self, space: Space, ends: dict[int, int], changes: list[tuple[int, tuple[int, int, int, int]]]) -> list[NodeScore]:
        scores = []
        weights = [self.weights[tier] for tier in _TIERS]
        for slot, length in ends.items():
            if length == 0:
                continue
            bit = 1 << slot
            runs: list[TierRun] = []
            for position, (start, tiers) in enumerate(changes):
                if start >= length:
                    break
                stop = min(changes[position + 1][0] if position + 1 < len(changes) else length, length)
                tier = next(t for t, m in zip(_TIERS, tiers, strict=True) if m & bit)
                if runs and runs[-1].tier is tier:
                    runs[-1] = TierRun(tier, runs[-1].start, stop - runs[-1].start)
                else:
                    runs.append(TierRun(tier, start, stop - start))
            score = sum(weights[run.tier] * run.blocks for run in runs)
            name = self._slot_names[slot] or ""
            scores.append(NodeScore(name, length, length * space.block_size, runs, round(score, 6)))
        scores.sort(key=lambda s: (-s.score, -s.blocks, s.node))
        return scores

    def lookup(self, space: Space, keys: Sequence[int]) -> list[list[Holding]]:
        with self._lock:
            blocks = self._blocks.get(space, {})
            alive, readers = self._alive()
            width, full = self._width, (1 << self._width) - 1
            answers: list[list[Holding]] = []
            for key in keys:
                mask = blocks.get(key, 0)
                found: list[Holding] = []
                for tier in _TIERS:
                    part = (mask >> tier * width) & full
                    if tier in SHARED_TIERS:
                        part = _expand(part, readers)
                    part &= alive
                    while part:
                        low = part & -part
                        found.append(Holding(self._slot_names[low.bit_length() - 1] or "", tier))
                        part ^= low
                answers.append(found)
            return answers

    def nodes(self) -> list[NodeStatus]:
        with self._lock:
            now = self._clock()
            statuses = []
            for name, node in sorted(self._nodes.items()):
                indexed: dict[str, int] = {}
                for holder_name in (name, node.info.s3_location):
                    holder = self._holders.get(holder_name) if holder_name else None
                    for (_, _, tier), held in (holder.sources.items() if holder else ()):
                        indexed[tier.label] = indexed.get(tier.label, 0) + len(held)
                age = now - node.last_seen
                statuses.append(NodeStatus(node.info, age, age <= self.heartbeat_ttl_s, indexed))
            return statuses

    def spaces(self) -> list[Space]:
        with self._lock:
            found = {space for space, blocks in self._blocks.items() if blocks}
            for node in self._nodes.values():
                found.update(Space(layout.model, layout.block_size) for layout in node.info.layouts)
            return sorted(found, key=lambda s: (s.model, s.block_size))

    def indexed_keys(self) -> int:
        """Distinct keys held anywhere (for memory accounting)."""
        with self._lock:
            return sum(len(blocks) for blocks in self._blocks.values())


def _expand(shared: int, readers: dict[int, int]) -> int:
    nodes = 0
    while shared:
        low = shared & -shared
        nodes |= readers.get(low.bit_length() - 1, 0)
        shared ^= low
    return nodes
