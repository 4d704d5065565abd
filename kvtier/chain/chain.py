"""The tier chain: host memory first, then lower tiers (disk, S3), with policy above them.

Placement: every write lands in the host tier. In write-back mode (the default) a committed
block is queued for demotion and copied into each lower tier by background threads; in
write-through mode the write returns only once every tier holds it. Reads look in host memory,
then each lower tier in order; a block found below is verified (checksum) and promoted into host
memory. Lookups answer from the catalogue alone, without I/O.

Invariants:

- Nothing ever returns bytes other than those put under a key: a block whose checksum fails
  when it comes back from a lower tier is a miss; it is deleted there and counted as corrupt.
- A tier's ``used_bytes`` never exceeds its capacity: room is made by evicting (policy order)
  before a block is written; when nothing can be evicted the write is refused or skipped.
- A pinned host copy (leased to a reader, or being demoted) is never evicted. Leases expire
  after ``lease_ttl_s`` if never released.
- Eviction prefers blocks that already have a copy in a lower tier. A host block waiting for
  its demotion is never evicted: when host memory holds nothing else, new writes are refused
  (counted as ``dropped``) rather than losing blocks already stored, so a prefix stays whole.

Locking: one lock guards the catalogue, policies, accounting and leases; it is never held
across disk or network I/O (host-memory copies of a single block are the only exception).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvtier.blocks.checksum import payload_checksum
from kvtier.blocks.keys import BlockKey
from kvtier.chain.promotion import Promotion
from kvtier.chain.records import BlockRecord, Lease, NotReserved
from kvtier.chain.stats import ChainStats, TierCounters, TierStats
from kvtier.config import ChainConfig, WriteMode
from kvtier.errors import (
    ConfigError,
    CorruptBlockError,
    InvalidRequestError,
    KVTierError,
    LeaseError,
    TierFullError,
)
from kvtier.policy import EvictionPolicy, make_policy
from kvtier.tiers.base import Buffer, Tier
from kvtier.tiers.host import HostTier, Slot

log = logging.getLogger(__name__)

HOST = 0
_MAX_ALLOC_RETRIES = 64


class _TierState:
    """Accounting of one tier inside the chain."""

    def __init__(self, index: int, tier: Tier, policy: EvictionPolicy[BlockKey]) -> None:
        self.index = index
        self.tier = tier
        self.policy = policy
        self.used_bytes = 0
        self.blocks = 0
        self.counters = TierCounters()

    def fits(self, nbytes: int) -> bool:
        capacity = self.tier.capacity_bytes
        return not capacity or self.used_bytes + nbytes <= capacity


class TierChain:
    """Host tier plus zero or more lower tiers, ordered fastest to slowest."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        config: ChainConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not tiers or not isinstance(tiers[0], HostTier):
            raise ConfigError("the first tier of a chain must be the host tier")
        self.config = config or ChainConfig()
        self.host: HostTier = tiers[0]
        self._clock = clock
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._states = [_TierState(i, t, make_policy(self.config.eviction)) for i, t in enumerate(tiers)]
        self._records: dict[BlockKey, BlockRecord] = {}
        self._leases: dict[int, Lease] = {}
        self._lease_ids = itertools.count(1)
        self._pending_demotions = 0
        self._closed = False
        self._watchers: list[Callable[[bool, int, BlockKey], None]] = []
        self._demoter = ThreadPoolExecutor(self.config.demotion_threads, thread_name_prefix="kvtier-demote")
        self._promoter = ThreadPoolExecutor(self.config.promotion_threads, thread_name_prefix="kvtier-promote")
        for state in self._states[1:]:
            self._load_catalogue(state)

    # ---- construction ------------------------------------------------------------------------

    def _load_catalogue(self, state: _TierState) -> None:
        """Register what a lower tier already holds (after a restart)."""
        for stored in state.tier.scan():
            if not self._adopt_locked(state, stored.key, stored.nbytes, stored.checksum):
                log.warning("%s: %s holds %d bytes, another tier %d; ignoring it", state.tier.name, stored.key, stored.nbytes,
                            self._records[stored.key].nbytes)

    def _adopt_locked(self, state: _TierState, key: BlockKey, nbytes: int, checksum: int | None) -> bool:
        """Record that ``state``'s tier holds ``key``; False if another tier holds it at another size."""
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = BlockRecord(nbytes, checksum)
        elif record.nbytes != nbytes:
            return False
        if record.in_tier(state.index):
            return True
        record.tiers |= 1 << state.index
        state.used_bytes += state.tier.stored_nbytes(nbytes)
        state.blocks += 1
        state.policy.insert(key)
        return True

    def adopt_shared(self, kind: str, keys: Sequence[BlockKey], nbytes: int) -> int:
        """Record blocks another node wrote to a shared tier of ``kind`` (the S3 bucket and prefix
        this chain reads too), known from the index: the catalogue read at start cannot have
        them. Nothing is read now; a later read checks each block (a block that is not there, or
        not whole, is a miss then). Returns how many were new here."""
        with self._lock:
            state = next((s for s in self._states[1:] if s.tier.kind == kind), None)
            if state is None:
                return 0
            adopted = 0
            for key in keys:
                record = self._records.get(key)
                if record is not None and record.tiers != 0:
                    continue
                if self._adopt_locked(state, key, nbytes, None):
                    adopted += 1
            return adopted

    # ---- change feed (for the index publisher) ------------------------------------------------

    def watch(self, callback: Callable[[bool, int, BlockKey], None]) -> None:
        """Call ``callback(stored, tier_index, key)`` whenever a tier gains (True) or loses a block.

        It runs under the chain's lock, in the order the changes happen: it must only record
        (append to a deque), never block or call back into the chain.
        """
        with self._lock:
            self._watchers.append(callback)

    def _changed(self, stored: bool, tier_index: int, key: BlockKey) -> None:
        for callback in self._watchers:
            callback(stored, tier_index, key)

    def snapshot_keys(self, at_snapshot: Callable[[], None]) -> list[BlockKey]:
        """Every key the chain knows, with ``at_snapshot()`` run under the same lock.

        A publisher clears its queue of changes in ``at_snapshot``: every change before is
        reflected in what :meth:`tiers_of` reports afterwards, every later one is queued.
        """
        with self._lock:
            at_snapshot()
            return list(self._records)

    def tiers_of(self, keys: Sequence[BlockKey]) -> list[int]:
        """Per key, the bitmask of tier indexes holding it now (0: none). One lock hold."""
        with self._lock:
            records = self._records
            return [record.tiers if (record := records.get(key)) is not None else 0 for key in keys]

    @property
    def tiers(self) -> list[Tier]:
        return [state.tier for state in self._states]

    # ---- writes ------------------------------------------------------------------------------

    def put(self, key: BlockKey, payload: Buffer, checksum: int | None = None) -> bool:
        """Store a block; return False if host memory had no room (nothing was stored)."""
        with self._lock:
            record = self._records.get(key)
            if record is not None and record.in_tier(HOST):
                self._states[HOST].policy.access(key)
                return True
        try:
            slot = self.reserve(key, len(payload))
        except TierFullError:
            return False
        self.host.slot_view(slot)[:] = payload
        self.commit(slot, checksum)
        return True

    def reserve(self, key: BlockKey, nbytes: int) -> Slot:
        """Reserve a host slot for a writer, evicting as needed; raise TierFullError if impossible.

        A refused write counts as ``dropped``: every evictable block is pinned or still waiting
        for its demotion (the writer outpaces the lower tiers; the step never waits for them).
        """
        with self._lock:
            self._check_open()
            try:
                return self._reserve_locked(key, nbytes)
            except TierFullError:
                self._states[HOST].counters.dropped += 1
                raise

    def reserve_absent(self, keys: Sequence[BlockKey], nbytes: int) -> list[Slot | NotReserved]:
        """For each key, under one lock: a reserved host slot, or why none was reserved (the chain
        holds the block already, in any tier; or no slot could be had, counted as ``dropped``)."""
        results: list[Slot | NotReserved] = []
        with self._lock:
            self._check_open()
            for key in keys:
                record = self._records.get(key)
                if record is not None and record.tiers != 0:
                    results.append(NotReserved.PRESENT)
                    continue
                try:
                    results.append(self._reserve_locked(key, nbytes))
                except TierFullError:
                    self._states[HOST].counters.dropped += 1
                    results.append(NotReserved.NO_SPACE)
        return results

    def commit(self, slot: Slot, checksum: int | None = None) -> BlockKey:
        """Make a reserved slot's bytes a visible block and schedule (or do) its demotion."""
        if checksum is None:
            checksum = payload_checksum(self.host.slot_view(slot))
        with self._lock:
            key = self._reserved_key(slot)
            record = self._records.get(key)
            if record is not None and record.in_tier(HOST):
                # Already there (a concurrent writer or promotion won). Same key, same bytes:
                # keep the existing slot, which a reader may hold, and drop this one.
                self.host.abort(slot)
                self._states[HOST].used_bytes -= self.host.stored_nbytes(slot.nbytes)
                return key
            self.host.commit(slot)
            if record is None or record.nbytes != slot.nbytes:
                record = self._records[key] = BlockRecord(slot.nbytes, checksum, tiers=0)
            record.checksum = checksum
            state = self._states[HOST]
            if not record.in_tier(HOST):
                record.tiers |= 1
                state.blocks += 1
                self._changed(True, HOST, key)
            state.counters.bytes_in += slot.nbytes
            state.policy.insert(key)
            needs_demotion = len(self._states) > 1 and not record.held_below(HOST)
            if needs_demotion:
                record.settled = False
                if self.config.write_mode is WriteMode.WRITE_BACK:
                    self._queue_demotion_locked(key)
        if needs_demotion and self.config.write_mode is WriteMode.WRITE_THROUGH:
            self._demote(key, queued=False)
        return key

    def _reserved_key(self, slot: Slot) -> BlockKey:
        key = self.host.reserved_key(slot)
        if key is None:
            raise InvalidRequestError(
                f"slot reservation {slot.reservation} is unknown (never made, already committed or aborted)"
            )
        return key

    def abort(self, slot: Slot) -> None:
        with self._lock:
            self.host.abort(slot)
            self._states[HOST].used_bytes -= self.host.stored_nbytes(slot.nbytes)

    def _reserve_locked(self, key: BlockKey, nbytes: int) -> Slot:
        state = self._states[HOST]
        charge = self.host.stored_nbytes(nbytes)
        for _ in range(_MAX_ALLOC_RETRIES):
            self._make_room_locked(state, charge)
            try:
                slot = self.host.reserve(key, nbytes)
            except TierFullError:
                # Room by accounting but no slot of this size: slabs are held by blocks of other
                # sizes. Evicting in policy order could take a whole arena of small blocks to free
                # one slab; empty the emptiest slab instead.
                if not self._empty_a_slab_locked(state):
                    break
                continue
            state.used_bytes += charge
            return slot
        raise TierFullError(
            f"host memory is full: no slot for a {nbytes}-byte block (every block is pinned or awaiting demotion)",
            tier=self.host.name,
        )

    # ---- eviction ----------------------------------------------------------------------------

    def _make_room_locked(self, state: _TierState, nbytes: int) -> list[BlockKey]:
        """Evict until ``nbytes`` more fit; return the victims whose bytes must still be deleted
        (lower tiers: deleted by the caller outside the lock; host: deleted here)."""
        victims: list[BlockKey] = []
        if state.index == HOST:
            self._expire_leases_locked()
        while not state.fits(nbytes):
            victim = self._evict_one_locked(state)
            if victim is None:
                raise TierFullError(
                    f"{state.tier.name} tier is full ({state.used_bytes} of {state.tier.capacity_bytes} "
                    "bytes) and every block in it is pinned or awaiting demotion",
                    tier=state.tier.name,
                )
            victims.append(victim)
        return victims

    def _evictable(self, state: _TierState, key: BlockKey, *, clean_only: bool) -> bool:
        """Whether ``key`` may leave ``state``'s tier: unpinned, and with a copy below (clean) or,
        as a last resort, any block of a lower tier or a settled host block (its demotion
        failed or was skipped; evicting it drops the block)."""
        record = self._records.get(key)
        if record is None:
            return False
        if record.pins == 0 and record.held_below(state.index):
            return True
        return not clean_only and (state.index != HOST or (record.pins == 0 and record.settled))

    def _evict_one_locked(self, state: _TierState) -> BlockKey | None:
        """Evict one block of ``state`` in policy order, preferring blocks with a copy below."""
        is_bottom = state.index == len(self._states) - 1
        victim = None if is_bottom else state.policy.pop_victim(lambda key: self._evictable(state, key, clean_only=True))
        if victim is None:
            victim = state.policy.pop_victim(lambda key: self._evictable(state, key, clean_only=False))
            if victim is None:
                return None
        self._evict_locked(state, victim)
        return victim

    def _empty_a_slab_locked(self, state: _TierState) -> bool:
        """Evict every block of the emptiest host slab whose blocks may all be evicted; False if none can be emptied."""
        for residents in self.host.slab_residents():
            if all(self._evictable(state, key, clean_only=False) for key in residents):
                for key in residents:
                    self._evict_locked(state, key)
                return True
        return False

    def _evict_locked(self, state: _TierState, victim: BlockKey) -> None:
        if state.index < len(self._states) - 1 and not self._records[victim].held_below(state.index):
            state.counters.dropped += 1
        self._forget_locked(state, victim)
        state.counters.evictions += 1
        if state.index == HOST:
            self.host.delete(victim)

    def _forget_locked(self, state: _TierState, key: BlockKey) -> None:
        """Remove ``key`` from ``state``'s accounting and the record (no I/O)."""
        record = self._records[key]
        record.tiers &= ~(1 << state.index)
        state.used_bytes -= state.tier.stored_nbytes(record.nbytes)
        state.blocks -= 1
        self._changed(False, state.index, key)
        state.policy.remove(key)
        if record.tiers == 0 and record.pins == 0:
            del self._records[key]

    def _delete_below(self, state: _TierState, keys: list[BlockKey]) -> None:
        for key in keys:
            try:
                state.tier.delete(key)
            except KVTierError as exc:
                log.warning("could not delete evicted block %s from %s: %s", key, state.tier.name, exc)
                with self._lock:
                    state.counters.errors += 1

    # ---- demotion ----------------------------------------------------------------------------

    def _queue_demotion_locked(self, key: BlockKey) -> None:
        if self._pending_demotions >= self.config.demotion_queue_limit:
            self._records[key].settled = True  # never demoted; evictable like any other
            self._states[HOST].counters.errors += 1
            return
        self._pending_demotions += 1
        self._demoter.submit(self._demote, key, True)

    def _demote(self, key: BlockKey, queued: bool) -> None:
        """Copy a host block into every lower tier that lacks it (runs on a demotion thread)."""
        try:
            with self._lock:
                record = self._records.get(key)
                if record is None or not record.in_tier(HOST):
                    return  # evicted before its turn
                record.pins += 1
                nbytes, checksum = record.nbytes, record.checksum
            try:
                view = self.host.view(key)
                if view is not None:
                    for state in self._states[1:]:
                        self._write_below(state, key, view, nbytes, checksum)
            finally:
                with self._lock:
                    record.pins -= 1
                    record.settled = True
                    if record.tiers == 0 and record.pins == 0:
                        self._records.pop(key, None)
        finally:
            if queued:
                with self._lock:
                    self._pending_demotions -= 1
                    if self._pending_demotions == 0:
                        self._idle.notify_all()

    def _write_below(self, state: _TierState, key: BlockKey, view: memoryview, nbytes: int, checksum: int | None) -> None:
        charge = state.tier.stored_nbytes(nbytes)
        with self._lock:
            record = self._records.get(key)
            if record is None or record.in_tier(state.index):
                return
            try:
                victims = self._make_room_locked(state, charge)
            except TierFullError:
                state.counters.errors += 1
                return
            state.used_bytes += charge  # reserved while writing
        self._delete_below(state, victims)
        try:
            state.tier.put(key, view, checksum if checksum is not None else payload_checksum(view))
        except KVTierError as exc:
            log.warning("demotion of %s to %s failed: %s", key, state.tier.name, exc)
            with self._lock:
                state.used_bytes -= charge
                state.counters.errors += 1
            return
        with self._lock:
            record = self._records.get(key)
            if record is None:  # deleted meanwhile; keep the copy tracked so it can be evicted
                record = self._records[key] = BlockRecord(nbytes, checksum)
            record.tiers |= 1 << state.index
            state.blocks += 1
            self._changed(True, state.index, key)
            state.policy.insert(key)
            state.counters.demotions += 1
            state.counters.bytes_in += nbytes

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued demotion has finished; False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending_demotions == 0, timeout)

    # ---- reads -------------------------------------------------------------------------------

    def lookup(self, keys: Sequence[BlockKey], refresh: bool = False) -> list[str]:
        """Tier names of the longest run of ``keys`` present, from the first key (no I/O). With
        ``refresh``, each block found counts as just used in its fastest tier's eviction order
        (an engine about to use the prefix), without being read or counted as a hit."""
        found: list[str] = []
        with self._lock:
            for key in keys:
                record = self._records.get(key)
                if record is None or record.tiers == 0:
                    break
                state = self._states[(record.tiers & -record.tiers).bit_length() - 1]
                if refresh:
                    state.policy.access(key)
                found.append(state.tier.name)
        return found

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            record = self._records.get(key)
            return record is not None and record.tiers != 0

    def get(self, key: BlockKey) -> bytes | None:
        """The block's bytes (verified if they came from below), or None on a miss."""
        data = self._copy_from_host(key, count=True)
        if data is not None or not self._promote(key):
            return data
        return self._copy_from_host(key, count=False)  # just promoted: read it pinned like any hit

    def _copy_from_host(self, key: BlockKey, count: bool) -> bytes | None:
        """Copy a host block out while pinned, so its slot cannot be reused mid-copy."""
        with self._lock:
            record = self._records.get(key)
            if record is None or not record.in_tier(HOST):
                if count:
                    self._states[HOST].counters.misses += 1
                return None
            record.pins += 1
        data = None
        try:
            view = self.host.view(key)
            data = bytes(view) if view is not None else None
        finally:
            with self._lock:
                record.pins -= 1
                if data is not None and count:
                    state = self._states[HOST]
                    state.counters.hits += 1
                    state.counters.bytes_out += len(data)
                    state.policy.access(key)
        return data

    def _promote(self, key: BlockKey) -> bool:
        """Bring a block from the highest lower tier holding it into host memory."""
        for state in self._states[1:]:
            with self._lock:
                record = self._records.get(key)
                if record is None:
                    return False
                if record.in_tier(HOST):
                    return True
                if not record.in_tier(state.index):
                    state.counters.misses += 1
                    continue
                nbytes, checksum = record.nbytes, record.checksum
                try:
                    slot = self._reserve_locked(key, nbytes)
                except TierFullError:
                    return False
            if self._read_below(state, key, slot):
                self.commit(slot, checksum)  # None (found by a scan): commit computes it
                with self._lock:
                    state.counters.promotions += 1
                return True
            self.abort(slot)
        return False

    def _read_below(self, state: _TierState, key: BlockKey, slot: Slot) -> bool:
        try:
            found = state.tier.read_into(key, self.host.slot_view(slot))
        except CorruptBlockError as exc:
            log.warning("corrupt block %s in %s: %s; deleting it", key, state.tier.name, exc)
            self._drop_from(state, key, corrupt=True)
            return False
        except KVTierError as exc:
            log.warning("reading %s from %s failed: %s", key, state.tier.name, exc)
            with self._lock:
                state.counters.errors += 1
                state.counters.misses += 1
            return False
        if not found:
            self._drop_from(state, key, corrupt=False)
            return False
        with self._lock:
            state.counters.hits += 1
            state.counters.bytes_out += slot.nbytes
            state.policy.access(key)
        return True

    def _drop_from(self, state: _TierState, key: BlockKey, corrupt: bool) -> None:
        with self._lock:
            record = self._records.get(key)
            if record is not None and record.in_tier(state.index):
                self._forget_locked(state, key)
            state.counters.misses += 1
            if corrupt:
                state.counters.corrupt += 1
        if corrupt:
            self._delete_below(state, [key])

    def prefetch(self, keys: Sequence[BlockKey]) -> Promotion:
        """Promote the longest present run of ``keys`` into host memory in the background; the
        :class:`Promotion` tells how far its leading run has got (its ``result`` waits for the end).
        Blocks are promoted concurrently (S3 and NVMe serve parallel reads far faster), in order."""
        present = list(itertools.takewhile(self.contains, keys))
        promotion = Promotion(len(present))
        with self._lock:  # blocks in host memory need no promotion thread (and no wake-up of one)
            in_host = [(record := self._records.get(key)) is not None and record.in_tier(HOST) for key in present]
        for index, key in enumerate(present):
            if in_host[index]:
                promotion.settle(index, True)
                continue
            future = self._promoter.submit(self._promote, key)
            future.add_done_callback(
                lambda f, i=index: promotion.settle(i, not f.cancelled() and f.exception() is None and bool(f.result())))
        return promotion

    # ---- leases ------------------------------------------------------------------------------

    def acquire(self, keys: Sequence[BlockKey], ttl_s: float | None = None) -> Lease:
        """Pin the leading run of ``keys`` that is in host memory; the lease lists them and where
        their bytes are.

        Counted as reads: a host hit per pinned block, a host miss where the run stops early.
        """
        with self._lock:
            self._check_open()
            self._expire_leases_locked()
            pinned: list[BlockKey] = []
            locations: list[tuple[Slot, int]] = []
            host = self._states[HOST]
            for key in keys:
                record = self._records.get(key)
                slot = self.host.location(key) if record is not None and record.in_tier(HOST) else None
                if slot is None or record.checksum is None:
                    host.counters.misses += 1  # the run stops at the first block not in host memory
                    break
                record.pins += 1
                host.policy.access(key)
                host.counters.hits += 1
                host.counters.bytes_out += record.nbytes
                pinned.append(key)
                locations.append((slot, record.checksum))
            lease = Lease(next(self._lease_ids), tuple(pinned), self._clock() + (ttl_s or self.config.lease_ttl_s), tuple(locations))
            self._leases[lease.lease_id] = lease
            return lease

    def release(self, lease_id: int) -> None:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                raise LeaseError(f"lease {lease_id} is unknown: never granted, already released or expired")
            self._unpin_locked(lease)

    def _expire_leases_locked(self) -> None:
        now = self._clock()
        for lease_id in [i for i, lease in self._leases.items() if lease.expires_at <= now]:
            self._unpin_locked(self._leases.pop(lease_id))

    def _unpin_locked(self, lease: Lease) -> None:
        for key in lease.keys:
            record = self._records.get(key)
            if record is not None:
                record.pins -= 1

    def expire_leases(self) -> None:
        with self._lock:
            self._expire_leases_locked()

    # ---- stats and lifecycle -----------------------------------------------------------------

    def stats(self) -> ChainStats:
        with self._lock:
            tiers = tuple(
                TierStats(
                    name=s.tier.name,
                    kind=s.tier.kind,
                    capacity_bytes=s.tier.capacity_bytes,
                    used_bytes=s.used_bytes,
                    blocks=s.blocks,
                    counters=TierCounters(**{f: getattr(s.counters, f) for f in TierCounters.__slots__}),
                )
                for s in self._states
            )
            pinned = sum(1 for record in self._records.values() if record.pins > 0)
            return ChainStats(tiers, self._pending_demotions, len(self._leases), pinned)

    def _check_open(self) -> None:
        if self._closed:
            raise KVTierError("the tier chain is closed")

    def close(self, flush_timeout: float | None = 30.0) -> None:
        """Stop taking writes, wait for demotions (up to ``flush_timeout``), close every tier."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.flush(flush_timeout)
        self._demoter.shutdown(wait=True, cancel_futures=True)
        self._promoter.shutdown(wait=True, cancel_futures=True)
        for state in self._states:
            state.tier.close()

    def __enter__(self) -> TierChain:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
