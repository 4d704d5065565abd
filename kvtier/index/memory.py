"""The in-memory index: the embedded default, and the view every Redis-backed replica queries.

Layout in memory. Every holder (a node, or a shared S3 location) gets a slot ``0..width-1``. Per
space, ``blocks`` maps an index key to one int with bit ``tier * width + slot`` set for every
holder that holds the key in that tier; equal masks share one object. A holder
holding a key in one tier through several sources (tensor-parallel ranks, engines) counts the
extra sources in ``_extra``, so the bit clears only with the last. Each holder keeps the set of
keys per ``(space, source, tier)``, which makes events idempotent and a reset or purge exact.

Scoring walks the prompt's keys once (one C call, :mod:`kvtier.index.walk`) and stops at the
first key nobody holds; the per-tier split is recomputed only where the holder bits change from
one block to the next, which is rare along a prefix. With the key sets per holder a key costs
about 170 bytes in all (``benchmarks/index.py``).

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
from kvtier.index.walk import Blocks, native_available, walk

_TIERS = tuple(IndexTier)
_INITIAL_WIDTH = 64
_MAX_SHARED_MASKS = 1 << 20

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
        self._masks: dict[int, int] = {}  # one object per distinct mask, see _shared
        native_available()  # build (once per machine) or load the C walk now, not under a query's lock
        self._nodes: dict[str, _Node] = {}
        self._alive_cache: tuple[float, int, dict[int, int]] | None = None  # (valid until, node mask, location -> nodes)

    # ---- writes ------------------------------------------------------------------------------

    def publish(self, batch: PublishBatch) -> ApplyStatus:
        with self._lock:
            node = self._nodes.get(batch.node)
            in_order = node is not None and node.info.session == batch.session and batch.seq == node.info.seq + 1
            if self._check_sessions and not batch.reset and not in_order:
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
        """Engine events also keep their node alive: a node may have engines and no daemon."""
        with self._lock:
            for event in events:
                if not is_engine_source(event.source):
                    raise InvalidRequestError(f"engine events come from sources named {ENGINE_SOURCE_PREFIX}..., got {event.source!r}")
            known = self._nodes.get(node)
            if known is None:
                self._nodes[node] = _Node(NodeInfo(node, "", 0), self._clock())
            else:
                known.last_seen = self._clock()
            for event in events:
                self._apply(node, event)
            self._alive_cache = None

    def heartbeat(self, info: NodeInfo, *, age_s: float = 0.0) -> ApplyStatus:
        """``age_s``: how long ago the heartbeat was sent (a replica loading a snapshot)."""
        with self._lock:
            node = self._nodes.get(info.node)
            if self._check_sessions and (node is None or node.info.session != info.session or node.info.seq != info.seq):
                return ApplyStatus.RESYNC
            seen = self._clock() - max(age_s, 0.0)
            if node is None:
                node = self._nodes[info.node] = _Node(info, seen)
            node.info, node.last_seen = info, seen
            self._alive_cache = None
            return ApplyStatus.OK

    def load(self, node: str, events: Iterable[BlockEvent]) -> None:
        """Apply stored holdings of ``node`` (or of a shared tier) without session checks or
        touching the node's liveness: a replica building its view from a snapshot."""
        with self._lock:
            for event in events:
                self._apply(node, event)
            self._alive_cache = None

    def forget(self, node: str) -> None:
        """Drop a node and all its holdings (shared tiers stay): it was purged elsewhere."""
        with self._lock:
            self._drop_holder(node)
            self._nodes.pop(node, None)
            self._drop_orphan_locations()
            self._alive_cache = None

    def expired(self) -> list[str]:
        """Nodes past their TTL, not purged yet."""
        with self._lock:
            now = self._clock()
            return [name for name, node in self._nodes.items() if now - node.last_seen > self.heartbeat_ttl_s]

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

    def _shared(self) -> dict[int, int]:
        """Masks are stored as one object per distinct value (a prompt's blocks are mostly held by
        the same holders): less memory per key, and a Score's walk compares equal neighbours by
        identity without touching another object. A cache only: cleared when it grows large."""
        if len(self._masks) > _MAX_SHARED_MASKS:
            self._masks.clear()
        return self._masks

    def _add(self, space: Space, held: set[int], keys: Iterable[int], position: int) -> None:
        blocks = self._blocks.setdefault(space, {})
        bit = 1 << position
        extra = self._extra
        shared = self._shared().setdefault
        for key in keys:
            if key in held:
                continue
            held.add(key)
            mask = blocks.get(key, 0)
            if mask & bit:
                extra_key = (space, key, position)
                extra[extra_key] = extra.get(extra_key, 0) + 1
            else:
                mask |= bit
                blocks[key] = shared(mask, mask)

    def _remove(self, space: Space, held: set[int], keys: Iterable[int], position: int) -> None:
        blocks = self._blocks.get(space, {})
        clear = ~(1 << position)
        extra = self._extra
        shared = self._shared().setdefault
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
                blocks[key] = shared(mask, mask)
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
        self._masks.clear()
        shared = self._masks.setdefault
        for blocks in self._blocks.values():
            for key, mask in blocks.items():
                widened = sum(((mask >> (t * old)) & old_full) << (t * width) for t in range(len(_TIERS)))
                blocks[key] = shared(widened, widened)
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
            dead = self.expired()
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

    def score_blocks(self, space: Space, blocks: Blocks, candidates: Sequence[str] | None = None) -> list[NodeScore]:
        with self._lock:
            table = self._blocks.get(space)
            if not table or not blocks:
                walk(table or {}, blocks)  # a malformed query is refused whatever the index holds
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
            # One pass over the blocks (in C where it builds); the loop below visits only the
            # blocks where the holders change, and the prefix ends at the first block nobody holds.
            held_blocks, points, point_masks = walk(table, blocks)
            changes: list[tuple[int, tuple[int, int, int, int]]] = []  # (block, best-tier masks) where they change
            ends: dict[int, int] = {}  # slot -> prefix length, for slots that dropped out
            tiers_now = (0, 0, 0, 0)
            for index, mask in zip(points, point_masks, strict=True):
                gpu, host, disk, shared = mask & full, (mask >> width) & full, (mask >> 2 * width) & full, mask >> 3 * width
                s3 = _expand(shared, readers) if shared else 0
                host &= ~gpu
                disk &= ~(gpu | host)
                s3 &= ~(gpu | host | disk)
                if (gpu, host, disk, s3) != tiers_now:
                    tiers_now = (gpu, host, disk, s3)
                    changes.append((index, tiers_now))
                held_now = gpu | host | disk | s3
                gone = alive & ~held_now
                alive &= held_now
                while gone:
                    low = gone & -gone
                    ends[low.bit_length() - 1] = index
                    gone ^= low
                if not alive:
                    break
            while alive:  # held up to the first block nobody holds (or the whole prompt)
                low = alive & -alive
                ends[low.bit_length() - 1] = held_blocks
                alive ^= low
            return self._scores(space, ends, changes)

    def _scores(self, space: Space, ends: dict[int, int], changes: list[tuple[int, tuple[int, int, int, int]]]) -> list[NodeScore]:
        """Runs per node from the change points: at each point only the slots that entered a
        tier get a new run, so the work is the number of tier transitions, not nodes x points."""
        runs: dict[int, list[TierRun]] = {slot: [] for slot, length in ends.items() if length}
        wanted = 0
        for slot in runs:
            wanted |= 1 << slot
        open_runs: dict[int, tuple[IndexTier, int]] = {}  # slot -> (tier, start) of its current run
        previous = (0, 0, 0, 0)
        for start, tiers in changes:
            for tier, old, new in zip(_TIERS, previous, tiers, strict=True):
                if new == old:
                    continue
                entered = new & ~old & wanted
                while entered:
                    low = entered & -entered
                    entered ^= low
                    slot = low.bit_length() - 1
                    if start >= ends[slot]:
                        continue
                    current = open_runs.get(slot)
                    if current is not None:
                        runs[slot].append(TierRun(current[0], current[1], start - current[1]))
                    open_runs[slot] = (tier, start)
            previous = tiers
        weights = [self.weights[tier] for tier in _TIERS]
        scores = []
        for slot, slot_runs in runs.items():
            length = ends[slot]
            tier, begin = open_runs[slot]  # a slot with a prefix entered a tier at block 0
            slot_runs.append(TierRun(tier, begin, length - begin))
            score = 0.0
            for run in slot_runs:
                score += weights[run.tier] * run.blocks
            scores.append(NodeScore(self._slot_names[slot] or "", length, length * space.block_size, slot_runs, score))
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
