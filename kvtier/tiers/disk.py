"""The local NVMe tier: one file per block, written to a temporary name and renamed into place.

On-disk layout under ``settings.path``::

    .lock                                   flock'ed by the one DiskTier that owns the folder
    <layout_id>/<hash[:2]>/<hash>.kvb       one block (hash = 32 lowercase hex digits)
    <layout_id>/<hash[:2]>/.<hash>.<rand>.tmp   a block being written (deleted at open)

A ``.kvb`` file is::

    offset 0      4096 bytes  header page: the 64-byte record header (kvtier.blocks.record), zeros
    offset 4096   n bytes     payload
                  pad         zeros up to a multiple of 4096 (file size = stored_nbytes(n))

Invariants:

- A ``.kvb`` file is complete when its name appears: it is written and closed (and fsync'ed when
  ``settings.fsync``) under a temporary name, then ``os.rename``d over the final name. A writer
  killed at any point leaves at most a ``.tmp`` file, which readers ignore and ``open`` deletes.
  Without ``fsync`` a *power loss* may leave a renamed file whose data never reached the device;
  the checksums catch that (CorruptBlockError), so it is still never served.
- Files are never modified after the rename, only replaced (another rename) or unlinked, so a
  reader that has a file open sees one consistent version.
- Every read checks the header checksum, the key, the length and the payload checksum.
- All I/O offsets and sizes are multiples of 4096, so the same files serve O_DIRECT and
  buffered I/O; ``o_direct=auto`` probes the filesystem once at open.
- Thread-safe: scratch buffers are per thread; the rename or unlink of a key and the
  ``used_bytes`` update happen under one of 64 striped locks. One DiskTier per folder (``.lock``),
  which is what makes deleting ``.tmp`` files at open safe.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import sys
import threading
from collections.abc import Iterator

from kvtier.blocks.keys import BlockKey
from kvtier.blocks.layout import check_layout_id
from kvtier.blocks.record import HEADER_NBYTES, decode_header, encode_header, verify_payload
from kvtier.config import DiskTierConfig, ODirectMode
from kvtier.errors import ConfigError, CorruptBlockError, DiskFullError, LayoutError, TierError
from kvtier.tiers._aligned_io import (
    O_DIRECT,
    PAGE,
    Scratch,
    as_bytes_view,
    fsync_dir,
    pread_all,
    probe_o_direct,
    pwrite_all,
    read_segments,
    round_up,
    size_or_zero,
    unlink_quietly,
    write_segments,
)
from kvtier.tiers.base import Buffer, StoredBlock, Tier

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover
    from typing_extensions import override

logger = logging.getLogger(__name__)

SUFFIX = ".kvb"
_HEX = frozenset("0123456789abcdef")
_LOCK_STRIPES = 64  # renames and unlinks of one key serialise on one stripe (exact used_bytes)


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in _HEX for c in text)


class DiskTier(Tier):
    """Blocks as files on a local filesystem. See the module docstring for layout and invariants."""

    kind = "disk"

    def __init__(self, settings: DiskTierConfig, name: str = "disk") -> None:
        super().__init__(name, settings.capacity)
        self.settings = settings
        self.root = os.path.abspath(settings.path)
        self._fsync = settings.fsync
        self._scratch = Scratch()
        self._stripes = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._used_lock = threading.Lock()
        self._closed = False
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise self._os_error(exc, self.root, "create the folder") from exc
        self._lock_fd = self._take_folder_lock()
        try:
            self.o_direct = self._choose_o_direct(settings.o_direct)
            self._used = self._clean_and_measure()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._direct_flag = O_DIRECT if self.o_direct else 0

    # ---- open ---------------------------------------------------------------------------------

    def _take_folder_lock(self) -> int:
        path = os.path.join(self.root, ".lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise self._os_error(exc, path, "open the lock file") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(
                f"disk tier {self.name}: {self.root} is in use by another kvtier process "
                "(or another DiskTier in this one); give each daemon its own disk.path"
            ) from exc
        return fd

    def _choose_o_direct(self, mode: ODirectMode) -> bool:
        if mode is ODirectMode.OFF:
            return False
        try:
            reason = probe_o_direct(self.root)
        except OSError as exc:
            raise self._os_error(exc, self.root, "probe O_DIRECT in") from exc
        if reason is None:
            logger.info("disk tier %s: O_DIRECT I/O in %s", self.name, self.root)
            return True
        if mode is ODirectMode.ON:
            raise ConfigError(
                f"disk.o_direct=on but O_DIRECT does not work in {self.root}: {reason}; "
                "use o_direct=auto (falls back to buffered I/O) or a folder on a local NVMe filesystem"
            )
        logger.info("disk tier %s: buffered I/O in %s (%s)", self.name, self.root, reason)
        return False

    def _clean_and_measure(self) -> int:
        """Delete leftover temporary files (from a crashed writer); return the size of all blocks."""
        used = 0
        for directory, entry in self._walk():
            if entry.name.endswith(".tmp"):
                try:
                    os.unlink(entry.path)
                    logger.info("disk tier %s: removed unfinished write %s", self.name, entry.path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise self._os_error(exc, entry.path, "remove the unfinished write") from exc
            elif directory is not None and self._key_of(directory, entry.name) is not None:
                try:
                    used += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    pass
        return used

    def _walk(self) -> Iterator[tuple[str | None, os.DirEntry[str]]]:
        """Yield ``(layout_id/xx or None at the root, file entry)`` for files at the expected depths."""
        try:
            with os.scandir(self.root) as top:
                layouts = []
                for entry in top:
                    if entry.is_dir(follow_symlinks=False):
                        layouts.append(entry)
                    elif entry.name.endswith(".tmp"):
                        yield None, entry
            for layout in layouts:
                if not _is_hex(layout.name, 16):
                    logger.warning("disk tier %s: ignoring unexpected folder %s", self.name, layout.path)
                    continue
                with os.scandir(layout.path) as shards:
                    shard_dirs = [s for s in shards if s.is_dir(follow_symlinks=False)]
                for shard in shard_dirs:
                    if not _is_hex(shard.name, 2):
                        logger.warning("disk tier %s: ignoring unexpected folder %s", self.name, shard.path)
                        continue
                    with os.scandir(shard.path) as files:
                        for entry in files:
                            if entry.is_file(follow_symlinks=False):
                                yield f"{layout.name}/{shard.name}", entry
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._os_error(exc, self.root, "list") from exc

    def _key_of(self, directory: str, filename: str) -> BlockKey | None:
        layout_id, _, shard = directory.partition("/")
        stem = filename[: -len(SUFFIX)]
        if filename.endswith(SUFFIX) and _is_hex(stem, 32) and stem[:2] == shard:
            try:
                return BlockKey(check_layout_id(layout_id), bytes.fromhex(stem))
            except LayoutError:
                pass
        if not filename.endswith(".tmp"):
            logger.warning(
                "disk tier %s: ignoring %s/%s/%s: not a block file name",
                self.name, self.root, directory, filename,
            )
        return None

    # ---- paths and errors ----------------------------------------------------------------------

    def path_of(self, key: BlockKey) -> str:
        """The file that holds ``key`` (whether or not it exists)."""
        hex_ = key.hash_hex
        return os.path.join(self.root, key.layout_id, hex_[:2], hex_ + SUFFIX)

    def _os_error(self, exc: OSError, path: str, action: str) -> TierError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "full" if exc.errno == errno.ENOSPC else "over its disk quota"
            return DiskFullError(
                f"disk tier {self.name}: the filesystem holding {path} is {what} ({exc.strerror}); "
                "blocks are not written to disk until space is freed (lower disk.capacity or free "
                "space there); the host tier keeps working",
                tier=self.name,
            )
        return TierError(
            f"disk tier {self.name}: could not {action} {path}: {exc.strerror or exc}", tier=self.name
        )

    def _check_open(self) -> None:
        if self._closed:
            raise TierError(f"disk tier {self.name} is closed", tier=self.name)

    def _stripe(self, key: BlockKey) -> threading.Lock:
        return self._stripes[key.block_hash[0] % _LOCK_STRIPES]

    # ---- primitives ------------------------------------------------------------------------------

    @override
    def stored_nbytes(self, payload_nbytes: int) -> int:
        return PAGE + round_up(payload_nbytes)

    @override
    def put(self, key: BlockKey, payload: Buffer, checksum: int) -> None:
        self._check_open()
        data = as_bytes_view(payload)
        final = self.path_of(key)
        directory = os.path.dirname(final)
        tmp = os.path.join(directory, f".{key.hash_hex}.{secrets.token_hex(4)}.tmp")
        size = self.stored_nbytes(len(data))
        header = self._scratch.write_header
        header[:HEADER_NBYTES] = encode_header(key, len(data), checksum)
        fd = -1
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | self._direct_flag, 0o644)
            except FileNotFoundError:
                self._make_dirs(directory)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | self._direct_flag, 0o644)
            pwrite_all(fd, write_segments(self._scratch, memoryview(header), data, self.o_direct), 0)
            if self._fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            with self._stripe(key):
                old = size_or_zero(final)
                os.rename(tmp, final)
                with self._used_lock:
                    self._used += size - old
            if self._fsync:
                fsync_dir(directory)
        except BaseException as exc:  # never leave the temporary file behind
            if fd >= 0:
                os.close(fd)
            unlink_quietly(tmp)
            if isinstance(exc, OSError):
                raise self._os_error(exc, final, "write") from exc
            raise

    def _make_dirs(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        if self._fsync:  # make the new folders themselves durable
            fsync_dir(os.path.dirname(directory))
            fsync_dir(self.root)

    @override
    def get(self, key: BlockKey) -> bytes | None:
        self._check_open()
        path = self.path_of(key)
        fd = self._open_for_read(path)
        if fd is None:
            return None
        try:
            file_size = os.fstat(fd).st_size
            if file_size < PAGE or file_size % PAGE:
                raise CorruptBlockError(f"{path}: truncated file ({file_size} bytes)", tier=self.name)
            if self.o_direct:
                whole = self._scratch.bounce(file_size)
                if pread_all(fd, [whole], 0) != file_size:
                    raise CorruptBlockError(f"{path}: file shrank while read", tier=self.name)
                header = decode_header(whole[:HEADER_NBYTES], tier=self.name, where=path)
                self._check_size(path, header.payload_nbytes, file_size)
                payload = whole[PAGE : PAGE + header.payload_nbytes]
                verify_payload(header, key, payload, tier=self.name, where=path)
                return bytes(payload)
            header_page = memoryview(self._scratch.read_header)
            pread_all(fd, [header_page], 0)
            header = decode_header(header_page[:HEADER_NBYTES], tier=self.name, where=path)
            self._check_size(path, header.payload_nbytes, file_size)
            data = os.pread(fd, header.payload_nbytes, PAGE) if header.payload_nbytes else b""
            verify_payload(header, key, data, tier=self.name, where=path)
            return data
        except OSError as exc:
            raise self._os_error(exc, path, "read") from exc
        finally:
            os.close(fd)

    @override
    def read_into(self, key: BlockKey, out: memoryview) -> bool:
        self._check_open()
        out = as_bytes_view(out)
        if out.readonly:
            raise TierError(f"disk tier {self.name}: read_into needs a writable buffer", tier=self.name)
        path = self.path_of(key)
        fd = self._open_for_read(path)
        if fd is None:
            return False
        try:
            file_size = os.fstat(fd).st_size
            segments, finish = read_segments(self._scratch, out, self.o_direct)
            whole = file_size == self.stored_nbytes(len(out))  # else read the header to say why not
            got = pread_all(fd, segments if whole else segments[:1], 0)
            if got < HEADER_NBYTES:
                raise CorruptBlockError(f"{path}: truncated file ({file_size} bytes)", tier=self.name)
            header = decode_header(segments[0][:HEADER_NBYTES], tier=self.name, where=path)
            if header.payload_nbytes != len(out):
                raise CorruptBlockError(
                    f"{path}: stored payload is {header.payload_nbytes} bytes, expected {len(out)}", tier=self.name
                )
            self._check_size(path, header.payload_nbytes, file_size)
            if got != sum(len(s) for s in segments):
                raise CorruptBlockError(f"{path}: short read ({got} bytes)", tier=self.name)
            finish()
            verify_payload(header, key, out, tier=self.name, where=path)
            return True
        except OSError as exc:
            raise self._os_error(exc, path, "read") from exc
        finally:
            os.close(fd)

    def _open_for_read(self, path: str) -> int | None:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC | self._direct_flag)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._os_error(exc, path, "open") from exc

    def _check_size(self, path: str, payload_nbytes: int, file_size: int) -> None:
        if file_size != self.stored_nbytes(payload_nbytes):
            raise CorruptBlockError(
                f"{path}: file is {file_size} bytes, header says a {payload_nbytes}-byte payload "
                f"({self.stored_nbytes(payload_nbytes)} bytes on disk)",
                tier=self.name,
            )

    @override
    def delete(self, key: BlockKey) -> bool:
        self._check_open()
        path = self.path_of(key)
        try:
            with self._stripe(key):
                size = os.stat(path).st_size
                os.unlink(path)
                with self._used_lock:
                    self._used -= size
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._os_error(exc, path, "delete") from exc

    @override
    def contains(self, key: BlockKey) -> bool:
        self._check_open()
        return os.path.isfile(self.path_of(key))

    @override
    def scan(self, *, read_headers: bool = True) -> Iterator[StoredBlock]:
        """Yield every block file. With ``read_headers`` (one 64-byte read each) sizes are exact and
        checksums known; without, ``nbytes`` is the padded size (within 4095 bytes of the truth).

        A file whose header is damaged is still yielded (padded size, no checksum), so the chain
        learns of it, reads it, gets CorruptBlockError and deletes it instead of leaking the space.
        """
        self._check_open()
        for directory, entry in self._walk():
            if directory is None or entry.name.endswith(".tmp"):
                continue
            key = self._key_of(directory, entry.name)
            if key is None:
                continue
            try:
                file_size = entry.stat(follow_symlinks=False).st_size
                padded = max(file_size - PAGE, 0)
                if not read_headers:
                    yield StoredBlock(key, padded)
                    continue
                with open(entry.path, "rb", buffering=0) as file:
                    raw = file.read(HEADER_NBYTES)
            except FileNotFoundError:  # deleted since listed
                continue
            except OSError as exc:
                raise self._os_error(exc, entry.path, "read") from exc
            try:
                header = decode_header(raw, tier=self.name, where=entry.path)
                if header.key != key:
                    raise CorruptBlockError(f"{entry.path}: holds {header.key}", tier=self.name)
                yield StoredBlock(key, header.payload_nbytes, header.checksum)
            except CorruptBlockError as exc:
                logger.warning("disk tier %s: damaged block file found by scan: %s", self.name, exc)
                yield StoredBlock(key, padded)

    def used_bytes(self) -> int:
        """Bytes of all block files (as counted at open and kept up to date by put and delete)."""
        with self._used_lock:
            return self._used

    @override
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._lock_fd)

    def __repr__(self) -> str:
        return (
            f"DiskTier(name={self.name!r}, path={self.root!r}, capacity_bytes={self.capacity_bytes}, "
            f"o_direct={self.o_direct})"
        )

