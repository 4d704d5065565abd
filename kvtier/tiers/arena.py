"""The shared-memory arena and its slab allocator (bookkeeping only, no I/O).

Arena: one file in a memory filesystem (``/dev/shm`` by default), created ``0600`` and mapped
``MAP_SHARED``, so another process of the same user (a vLLM worker) maps the same bytes with
:meth:`SharedArena.attach` and reads or writes slots in place. The file holds raw slot bytes and
no header: which key lives at which offset is told by the owner (the daemon), never read from
the arena. Space is reserved with ``posix_fallocate`` at creation so a full ``/dev/shm`` fails
then, with a clear error, instead of a ``SIGBUS`` on first touch.

Ownership: the creating process holds an exclusive ``flock`` on the file for as long as it has it
open; the kernel drops the lock when the process dies, however it dies. A file that matches
:data:`ARENA_GLOB` and is not locked was therefore left behind by a dead owner (``SIGKILL``, OOM
kill, a crashed container in the same pod), and :func:`remove_stale_arenas` removes it, since
nothing else would and each one holds host memory. Clients that attach never lock.

Pages: on a memory filesystem mounted ``huge=always`` or ``huge=advise`` (the arena asks for huge
pages with ``MADV_HUGEPAGE``), or on hugetlbfs, the arena is backed by 2 MiB pages. On virtual
machines 4 KiB-page memory can differ in copy speed by tens of percent from one region to the next;
huge pages make it uniform and faster (see ``docs/host-arena.md``).

Allocator: the arena is cut into pages of ``page_nbytes``. A *slab* serves one slot size (one
layout's block size, rounded up to ``SLOT_ALIGN``) and is one page, or a run of contiguous pages
for blocks larger than a page. Slots never straddle slabs, every slot offset is a multiple of
``SLOT_ALIGN`` (so the disk tier can use ``O_DIRECT`` straight from a slot), and a slab whose
slots are all free returns its pages to the arena, so the split between layouts follows demand.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import functools
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.errors import ConfigError, TierFullError

log = logging.getLogger(__name__)

SLOT_ALIGN = 4096
ARENA_GLOB = "kvtier-*-arena"  # the names kvtier gives arena files (see HostTier)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault every page in for writing, contents unchanged
# Per madvise call. Small, because the call holds the process's mmap lock (shared) while the
# kernel zeroes the chunk's pages, and any mmap/munmap in the daemon (Python's allocator, a
# large reply buffer, a new thread's stack) waits for it: 64 MiB chunks at nice 19 on a busy
# node stalled calls right after a start by 10-150 ms. The thread also checks between chunks
# whether the map closed.
_POPULATE_CHUNK = 4 << 20


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)  # calls release the GIL


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class SharedArena:
    """A shared, file-backed memory region. ``owner`` arenas unlink their file on :meth:`close`."""

    def __init__(self, path: Path, fd: int, nbytes: int, owner: bool, populate: bool = False) -> None:
        self.path = path
        self.nbytes = nbytes
        self.owner = owner
        self._fd = fd
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        self._map = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self._map.madvise(mmap.MADV_HUGEPAGE)  # honoured on huge=advise mounts; a no-op elsewhere
        except (AttributeError, OSError):
            pass  # no transparent huge pages in this kernel
        self.buffer = memoryview(self._map)
        self._populated = threading.Event()
        self._mapping_lock = threading.Lock()  # held by the prefault thread per chunk, and by close
        if populate:
            self._populated.set()

    @classmethod
    def create(cls, path: Path, nbytes: int, populate: bool = False) -> SharedArena:
        """Create a new arena file of ``nbytes``, mode 0600, and hold its owner lock. A file of
        that name left by a dead owner is replaced; one whose owner is alive is an error.

        ``populate`` maps every page now (``MAP_POPULATE``, about 0.5 s per GiB, once at start)
        instead of taking a page fault on each page's first touch while serving."""
        if nbytes <= 0:
            raise ConfigError(f"host arena size must be positive, got {nbytes}")
        fd = _create_owned(path)
        try:
            os.fchmod(fd, 0o600)
            os.posix_fallocate(fd, 0, nbytes)
            return cls(path, fd, nbytes, owner=True, populate=populate)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise ConfigError(
                f"cannot reserve {nbytes} bytes for the host arena in {path.parent}: {exc.strerror}; "
                "lower host.capacity or enlarge the memory filesystem (e.g. the pod's /dev/shm)"
            ) from exc

    @classmethod
    def attach(cls, path: Path | str, populate: bool = False) -> SharedArena:
        """Map an existing arena created by another process (``populate``: see :meth:`create`)."""
        fd = os.open(path, os.O_RDWR)
        return cls(Path(path), fd, os.fstat(fd).st_size, owner=False, populate=populate)

    def view(self, offset: int, nbytes: int) -> memoryview:
        return self.buffer[offset : offset + nbytes]

    def base_address(self) -> int:
        """The virtual address of the arena's first byte in this process (for NIXL registration);
        valid until :meth:`close`."""
        holder = ctypes.c_char.from_buffer(self._map)  # an export of the map, only to learn its address
        try:
            return ctypes.addressof(holder)
        finally:
            del holder

    def populate_in_background(self) -> threading.Thread:
        """Map every page of this mapping on a background thread (``MADV_POPULATE_WRITE``, in
        chunks, without the GIL), so the arena is usable at once and its pages stop costing a
        fault on first touch soon after. The bytes are not changed: clients may write meanwhile.
        Kernels without ``MADV_POPULATE_WRITE`` (before 5.14) keep faulting pages on first use."""
        thread = threading.Thread(target=self._populate, name="kvtier-arena-prefault", daemon=True)
        thread.start()
        return thread

    def wait_populated(self, timeout: float | None = None) -> bool:
        """Whether every page is mapped (after :meth:`populate_in_background`), waiting up to ``timeout``."""
        return self._populated.wait(timeout)

    def _populate(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only: after serving and engines
        except (AttributeError, OSError):
            pass
        try:
            madvise = _libc().madvise
            holder = ctypes.c_char.from_buffer(self._map)  # an export of the map, only to learn its address
            base = ctypes.addressof(holder)
            del holder
            started = time.monotonic()
            for start in range(0, self.nbytes, _POPULATE_CHUNK):
                length = min(_POPULATE_CHUNK, self.nbytes - start)
                with self._mapping_lock:  # never on an address range that close() unmapped
                    if self._map.closed:
                        return
                    failed = madvise(ctypes.c_void_p(base + start), ctypes.c_size_t(length), _MADV_POPULATE_WRITE) != 0
                if failed:
                    log.info("host arena %s: pages are mapped on first use (madvise: %s)", self.path,
                             os.strerror(ctypes.get_errno()))
                    return
            self._log_pages(time.monotonic() - started)
        except (OSError, ValueError, AttributeError) as exc:  # no libc, or the map closed meanwhile
            log.info("host arena %s: pages are mapped on first use (%s)", self.path, exc)
            return
        finally:
            self._populated.set()

    def _log_pages(self, seconds: float) -> None:
        """Say what pages back the arena: on 4 KiB pages copies are slower, and on VMs their speed
        varies by tens of percent from one region of memory to the next."""
        huge = self.huge_page_bytes()
        log.info("host arena %s: %d MiB mapped in %.1fs, %d MiB of it on huge pages", self.path, self.nbytes >> 20,
                 seconds, huge >> 20)
        if huge < self.nbytes // 2:
            log.info("for faster copies put the host arena on huge pages: point host.shm_dir at a tmpfs mounted "
                     "huge=always or at hugetlbfs (docs/host-arena.md)")

    def huge_page_bytes(self) -> int:
        """How many bytes of this process's mapping of the arena are on huge pages now (0 where
        ``/proc/self/smaps`` is unavailable). Only pages touched so far count: see ``populate``."""
        return huge_mapped_bytes(self.path)

    def close(self) -> None:
        """Unmap (and, for the owner, remove the file). Views still in use keep the map alive."""
        try:
            with self._mapping_lock:
                self.buffer.release()
                self._map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes away with it
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self._fd)  # drops the owner lock, after the name is gone


_HUGE_FIELDS = ("ShmemPmdMapped:", "FilePmdMapped:", "Shared_Hugetlb:", "Private_Hugetlb:")


def huge_mapped_bytes(path: Path, smaps: str = "/proc/self/smaps") -> int:
    """Bytes on huge pages (transparent or hugetlbfs) in this process's mappings of ``path``."""
    try:
        text = Path(smaps).read_text()
    except OSError:
        return 0
    total, inside = 0, False
    suffix = f" {path}"
    for line in text.splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":  # a mapping's header: "start-end perms ... path"
            inside = line.endswith(suffix)
        elif inside and line.startswith(_HUGE_FIELDS):
            total += int(line.split()[1]) * 1024
    return total


def _create_owned(path: Path) -> int:
    """Create ``path`` exclusively and take its owner lock; return the descriptor.

    Between the create and the lock another process's :func:`_remove_if_stale` may lock and
    unlink the new file; the name is then checked to still be ours, and the create retried."""
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            if _remove_if_stale(path):
                continue
            raise ConfigError(
                f"arena file {path} belongs to a running kvtier process; give this one another "
                "host.name or host.shm_dir"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot create arena file {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _names(path, fd):
                return fd
        except BlockingIOError:
            pass  # a sweeper holds it for a moment and will unlink it
        os.close(fd)
    raise ConfigError(f"cannot create arena file {path}: it keeps being replaced by another process")


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open on ``fd``."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _remove_if_stale(path: Path) -> bool:
    """Unlink ``path`` if it is an arena file of this user whose owner lock is free (its owner
    died). Return True if the name is free now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # a symlink, or not ours to open: leave it
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its owner is alive
        if _names(path, fd):
            os.unlink(path)
        return True
    finally:
        os.close(fd)


def remove_stale_arenas(directory: Path) -> int:
    """Remove the arena files in ``directory`` that dead kvtier processes left behind (see the
    module docstring); return how many bytes of memory that gave back."""
    freed = 0
    for path in directory.glob(ARENA_GLOB):
        try:
            nbytes = path.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
        if path.is_file() and _remove_if_stale(path):
            freed += nbytes
            log.warning("removed %s (%d MiB), an arena left behind by a kvtier process that died", path, nbytes >> 20)
    return freed


@dataclass(slots=True)
class _Slab:
    first_page: int
    npages: int
    slot_nbytes: int
    free_slots: list[int]  # offsets of free slots
    slot_count: int

    @property
    def used(self) -> int:
        return self.slot_count - len(self.free_slots)


@dataclass(slots=True)
class _SlotClass:
    slot_nbytes: int
    partial: dict[int, _Slab] = field(default_factory=dict)  # first_page -> slab with free slots
    current: _Slab | None = None  # the slab allocations come from while it has free slots


class SlabAllocator:
    """Fixed-size slots carved from slabs of arena pages. Not thread-safe: the caller locks."""

    def __init__(self, arena_nbytes: int, page_nbytes: int) -> None:
        if page_nbytes % SLOT_ALIGN:
            raise ConfigError(f"host.slab_size must be a multiple of {SLOT_ALIGN}, got {page_nbytes}")
        self.page_nbytes = page_nbytes
        self.npages = arena_nbytes // page_nbytes
        if self.npages == 0:
            raise ConfigError(f"host arena ({arena_nbytes} bytes) is smaller than one slab ({page_nbytes} bytes)")
        self._page_free = bytearray(b"\x01") * self.npages
        self._free_pages = self.npages
        self._owner: dict[int, _Slab] = {}  # first_page -> slab
        self._classes: dict[int, _SlotClass] = {}
        self.used_bytes = 0  # bytes of allocated slots

    @property
    def capacity_bytes(self) -> int:
        return self.npages * self.page_nbytes

    @staticmethod
    def slot_nbytes_for(nbytes: int) -> int:
        return round_up(max(nbytes, 1), SLOT_ALIGN)

    def allocate(self, nbytes: int) -> int:
        """Return the offset of a free slot for ``nbytes``; raise TierFullError when none is left.

        On the hot path of every put: keep it to a few dictionary and list operations."""
        slot_nbytes = (nbytes + SLOT_ALIGN - 1) & -SLOT_ALIGN if nbytes > 0 else SLOT_ALIGN
        klass = self._classes.get(slot_nbytes)
        if klass is None:
            klass = self._classes[slot_nbytes] = _SlotClass(slot_nbytes)
        slab = klass.current
        if slab is None or not slab.free_slots:
            if not klass.partial:
                self._new_slab(klass)
            slab = klass.current = next(iter(klass.partial.values()))
        offset = slab.free_slots.pop()
        if not slab.free_slots:
            del klass.partial[slab.first_page]
            klass.current = None
        self.used_bytes += slot_nbytes
        return offset

    def free(self, offset: int, nbytes: int) -> None:
        slot_nbytes = self.slot_nbytes_for(nbytes)
        slab = self._slab_of(offset)
        if slab.slot_nbytes != slot_nbytes:
            raise AssertionError(f"slot at {offset} is {slab.slot_nbytes} bytes, freed as {slot_nbytes}")
        slab.free_slots.append(offset)
        self.used_bytes -= slot_nbytes
        klass = self._classes[slot_nbytes]
        if slab.used == 0:
            klass.partial.pop(slab.first_page, None)
            if klass.current is slab:
                klass.current = None
            self._release_slab(slab)
        else:
            klass.partial[slab.first_page] = slab

    def slab_offsets_emptiest_first(self) -> list[int]:
        """Start offsets of the slabs in use, fewest used slots first: the cheapest ones to empty
        when a slot size needs a slab and no pages are free."""
        slabs = sorted(self._owner.values(), key=lambda slab: slab.used)
        return [slab.first_page * self.page_nbytes for slab in slabs]

    def _slab_of(self, offset: int) -> _Slab:
        page = offset // self.page_nbytes
        while page >= 0:
            slab = self._owner.get(page)
            if slab is not None:
                return slab
            page -= 1
        raise AssertionError(f"offset {offset} belongs to no slab")

    def _new_slab(self, klass: _SlotClass) -> None:
        npages = max(1, -(-klass.slot_nbytes // self.page_nbytes))
        first = self._find_free_run(npages)
        if first is None:
            raise TierFullError(
                f"host arena has no free slab for {klass.slot_nbytes}-byte slots "
                f"({self._free_pages} of {self.npages} pages free)",
                tier="host",
            )
        for page in range(first, first + npages):
            self._page_free[page] = 0
        self._free_pages -= npages
        base = first * self.page_nbytes
        count = (npages * self.page_nbytes) // klass.slot_nbytes
        slots = [base + i * klass.slot_nbytes for i in reversed(range(count))]
        slab = _Slab(first, npages, klass.slot_nbytes, slots, count)
        self._owner[first] = slab
        klass.partial[first] = slab

    def _release_slab(self, slab: _Slab) -> None:
        del self._owner[slab.first_page]
        for page in range(slab.first_page, slab.first_page + slab.npages):
            self._page_free[page] = 1
        self._free_pages += slab.npages

    def _find_free_run(self, npages: int) -> int | None:
        if self._free_pages < npages:
            return None
        if npages == 1:
            index = self._page_free.find(1)
            return None if index < 0 else index
        index = self._page_free.find(b"\x01" * npages)
        return None if index < 0 else index
