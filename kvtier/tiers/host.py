"""The host-memory tier: blocks in slots of a shared-memory arena (see ``kvtier.tiers.arena``).

Besides the plain :class:`Tier` verbs it offers the zero-copy data plane the engine uses:
:meth:`HostTier.reserve` a slot, let a writer (possibly another process that mapped the arena)
fill it, then :meth:`HostTier.commit` it; :meth:`HostTier.view` returns the committed bytes in
place. A reserved slot is invisible to readers until committed. The tier itself never checks
whether a slot is in use by a reader: the chain's pins guarantee a slot is not freed while
leased.

Capacity is hard: the arena's size. A put that finds no free slot raises TierFullError.
"""

from __future__ import annotations

import bisect
import itertools
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kvtier.blocks.keys import BlockKey
from kvtier.config import HostTierConfig
from kvtier.errors import CorruptBlockError, InvalidRequestError, KVTierError
from kvtier.tiers.arena import SharedArena, SlabAllocator, remove_stale_arenas
from kvtier.tiers.base import Buffer, PutRequest, StoredBlock, Tier

AUTO_CAPACITY_CAP = 64 * 1024**3


@dataclass(slots=True)
class Slot:
    """A region of the arena: ``nbytes`` of payload at ``offset``. ``reservation`` ids a reserved one."""

    offset: int
    nbytes: int
    reservation: int = 0


def auto_host_capacity(shm_dir: Path, slab_nbytes: int) -> int:
    """A quarter of available memory, capped at 64 GiB and by the free space of ``shm_dir``."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    shm_free = shutil.disk_usage(shm_dir).free
    capacity = min(available // 4, AUTO_CAPACITY_CAP, int(shm_free * 0.9))
    return max(slab_nbytes, capacity // slab_nbytes * slab_nbytes)


_instance_counter = itertools.count()


class HostTier(Tier):
    kind: ClassVar[str] = "host"

    def __init__(self, settings: HostTierConfig, name: str = "host") -> None:
        remove_stale_arenas(settings.shm_dir)  # before sizing: they hold memory the arena may use
        capacity = settings.capacity or auto_host_capacity(settings.shm_dir, settings.slab_size)
        self._allocator = SlabAllocator(capacity, settings.slab_size)
        super().__init__(name, self._allocator.capacity_bytes)
        filename = settings.name or f"kvtier-{os.getpid()}-{next(_instance_counter)}-arena"
        self.arena = SharedArena.create(settings.shm_dir / filename, self._allocator.capacity_bytes)
        if settings.prefault:
            self.arena.populate_in_background()  # serving starts now; first-touch faults fade out
        self._lock = threading.Lock()
        self._committed: dict[BlockKey, Slot] = {}
        self._reserved: dict[int, tuple[BlockKey, Slot]] = {}
        self._reservation_ids = itertools.count(1)

    # ---- zero-copy data plane ----------------------------------------------------------------

    def reserve(self, key: BlockKey, nbytes: int) -> Slot:
        """Reserve a slot for ``nbytes``; raise TierFullError when the arena has none free."""
        if nbytes <= 0:
            raise InvalidRequestError(f"block size must be positive, got {nbytes}")
        with self._lock:
            offset = self._allocator.allocate(nbytes)
            slot = Slot(offset, nbytes, next(self._reservation_ids))
            self._reserved[slot.reservation] = (key, slot)
            return slot

    def commit(self, slot: Slot) -> BlockKey:
        """Make a reserved slot visible under its key (replacing an older copy, whose slot is freed)."""
        with self._lock:
            key, reserved = self._take_reservation(slot)
            previous = self._committed.pop(key, None)
            if previous is not None:
                self._allocator.free(previous.offset, previous.nbytes)
            self._committed[key] = Slot(reserved.offset, reserved.nbytes)
            return key

    def abort(self, slot: Slot) -> None:
        """Return a reserved slot unused."""
        with self._lock:
            _, reserved = self._take_reservation(slot)
            self._allocator.free(reserved.offset, reserved.nbytes)

    def _take_reservation(self, slot: Slot) -> tuple[BlockKey, Slot]:
        try:
            return self._reserved.pop(slot.reservation)
        except KeyError:
            raise InvalidRequestError(
                f"slot reservation {slot.reservation} is unknown (never made, already committed or aborted)"
            ) from None

    def reserved_key(self, slot: Slot) -> BlockKey | None:
        """The key a reservation was made for, or None if it is not (or no longer) reserved."""
        with self._lock:
            entry = self._reserved.get(slot.reservation)
            return None if entry is None else entry[0]

    def slab_residents(self) -> Iterator[list[BlockKey]]:
        """The committed blocks of each slab, emptiest slab first, skipping slabs that hold an
        uncommitted reservation (those cannot be emptied now). Evicting all of one slab's blocks
        returns its pages to the arena, for slots of any size."""
        with self._lock:
            order = self._allocator.slab_offsets_emptiest_first()
            starts = sorted(order)
            residents: dict[int, list[BlockKey]] = {start: [] for start in starts}
            for key, slot in self._committed.items():
                residents[starts[bisect.bisect_right(starts, slot.offset) - 1]].append(key)
            busy = {starts[bisect.bisect_right(starts, slot.offset) - 1] for _, slot in self._reserved.values()}
        return (residents[start] for start in order if start not in busy)

    def slot_view(self, slot: Slot) -> memoryview:
        return self.arena.view(slot.offset, slot.nbytes)

    def location(self, key: BlockKey) -> Slot | None:
        with self._lock:
            return self._committed.get(key)

    def view(self, key: BlockKey) -> memoryview | None:
        """The committed bytes in place; valid while the caller holds a pin on the block."""
        slot = self.location(key)
        return None if slot is None else self.arena.view(slot.offset, slot.nbytes)

    # ---- Tier primitives ---------------------------------------------------------------------

    def put(self, key: BlockKey, payload: Buffer, checksum: int) -> None:
        with self._lock:  # one critical section: the copy holds the GIL anyway
            self._put_locked(key, payload)

    def put_many(self, requests: Sequence[PutRequest]) -> list[KVTierError | None]:
        """Store a batch under one lock acquisition (the per-block cost matters for small blocks)."""
        results: list[KVTierError | None] = []
        with self._lock:
            for request in requests:
                try:
                    self._put_locked(request.key, request.payload)
                    results.append(None)
                except KVTierError as exc:
                    results.append(exc)
        return results

    def _put_locked(self, key: BlockKey, payload: Buffer) -> None:
        nbytes = len(payload)
        if nbytes <= 0:
            raise InvalidRequestError(f"block size must be positive, got {nbytes}")
        offset = self._allocator.allocate(nbytes)
        self.arena.buffer[offset : offset + nbytes] = payload
        previous = self._committed.get(key)
        self._committed[key] = Slot(offset, nbytes)
        if previous is not None:
            self._allocator.free(previous.offset, previous.nbytes)

    def get(self, key: BlockKey) -> bytes | None:
        view = self.view(key)
        return None if view is None else bytes(view)

    def read_into(self, key: BlockKey, out: memoryview) -> bool:
        view = self.view(key)
        if view is None:
            return False
        if len(view) != len(out):
            raise CorruptBlockError(f"{key}: stored payload is {len(view)} bytes, expected {len(out)}", tier=self.name)
        out[:] = view
        return True

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            slot = self._committed.pop(key, None)
            if slot is None:
                return False
            self._allocator.free(slot.offset, slot.nbytes)
            return True

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return key in self._committed

    def scan(self) -> Iterator[StoredBlock]:
        with self._lock:
            items = list(self._committed.items())
        return (StoredBlock(key, slot.nbytes) for key, slot in items)

    def stored_nbytes(self, payload_nbytes: int) -> int:
        return SlabAllocator.slot_nbytes_for(payload_nbytes)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._allocator.used_bytes

    def close(self) -> None:
        with self._lock:
            self._committed.clear()
            self._reserved.clear()
        self.arena.close()
