"""Page-aligned I/O helpers for the disk tier: buffers, addresses, the O_DIRECT probe, full writes.

``O_DIRECT`` needs every I/O segment's address, length and file offset to be a multiple of the
device's logical block size. kvtier uses :data:`PAGE` (4096), which covers 512-byte and 4 KiB
devices. Anonymous ``mmap`` gives page-aligned memory; per-thread scratch buffers are reused
instead of mapping per call and are never shared between threads.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

from kvtier.tiers.base import Buffer

PAGE = 4096
ZERO_PAGE = memoryview(bytes(PAGE))
#: Scratch buffers larger than this are mapped for one call and unmapped, not kept per thread.
_MAX_KEPT_SCRATCH = 64 << 20
O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def round_up(nbytes: int, align: int = PAGE) -> int:
    return -(-nbytes // align) * align


def as_bytes_view(data: Buffer) -> memoryview:
    """A flat, byte-format memoryview of ``data`` (copying only if it is not C-contiguous)."""
    view = memoryview(data)
    if view.ndim == 1 and view.format in ("B", "b", "c"):
        return view if view.format == "B" else view.cast("B")
    if view.c_contiguous:
        return view.cast("B")
    return memoryview(view.tobytes())


class _PyBuffer(ctypes.Structure):  # CPython's Py_buffer
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer: Any
try:
    _get_buffer = ctypes.pythonapi.PyObject_GetBuffer
    _get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
    _get_buffer.restype = ctypes.c_int
    _release_buffer = ctypes.pythonapi.PyBuffer_Release
    _release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
    _release_buffer.restype = None
except (AttributeError, OSError):  # not CPython: every buffer is treated as unaligned
    _get_buffer = None


def address_of(view: memoryview) -> int | None:
    """Start address of a contiguous buffer (read-only ones too), or None when unknown."""
    if len(view) == 0:
        return None
    if not view.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    if _get_buffer is None:
        return None
    info = _PyBuffer()
    try:
        if _get_buffer(view, ctypes.byref(info), 0) != 0:  # PyBUF_SIMPLE: contiguous bytes
            return None
    except BufferError:
        return None
    address: int | None = info.buf
    _release_buffer(ctypes.byref(info))
    return address


def is_aligned(view: memoryview) -> bool:
    """Whether ``view`` starts on a page boundary (usable as an O_DIRECT segment)."""
    address = address_of(view)
    return address is not None and address % PAGE == 0


class Scratch(threading.local):
    """Per-thread aligned buffers: a header page for writes, one for reads, a tail page, a bounce buffer.

    ``write_header`` is only ever written in its first 64 bytes, so its padding stays zero.
    """

    def __init__(self) -> None:
        self.write_header = mmap.mmap(-1, PAGE)
        self.read_header = mmap.mmap(-1, PAGE)
        self.tail = mmap.mmap(-1, PAGE)
        self._bounce: mmap.mmap | None = None

    def bounce(self, nbytes: int) -> memoryview:
        """An aligned writable view of ``nbytes`` (the thread's reused buffer unless it is huge)."""
        size = round_up(max(nbytes, PAGE), 1 << 20)
        if size > _MAX_KEPT_SCRATCH:
            return memoryview(mmap.mmap(-1, round_up(nbytes)))[:nbytes]  # unmapped with the view
        if self._bounce is None or len(self._bounce) < size:
            self._bounce = mmap.mmap(-1, size)  # the old map goes once no view of it is left
        return memoryview(self._bounce)[:nbytes]


def write_segments(scratch: Scratch, header: memoryview, data: memoryview, direct: bool) -> list[memoryview]:
    """Header page + payload + zero padding to a page multiple, as segments O_DIRECT accepts if ``direct``.

    Buffered I/O writes the caller's buffer as is. O_DIRECT writes a page-aligned payload in
    place (only a last partial page goes through ``scratch.tail``) and copies others into the bounce buffer.
    """
    full, rest = divmod(len(data), PAGE)
    if not direct:
        return [header, data, ZERO_PAGE[: (PAGE - rest) % PAGE]]
    if is_aligned(data):
        segments = [header, data[: full * PAGE]]
        if rest:
            tail = scratch.tail
            tail[:rest] = data[full * PAGE :]
            tail[rest:] = ZERO_PAGE[rest:]
            segments.append(memoryview(tail))
        return segments
    bounce = scratch.bounce(round_up(len(data)))
    bounce[: len(data)] = data
    bounce[len(data) :] = ZERO_PAGE[: len(bounce) - len(data)]
    return [header, bounce]


def read_segments(scratch: Scratch, out: memoryview, direct: bool) -> tuple[list[memoryview], Callable[[], None]]:
    """Segments to read a whole block file (header page first) so the payload lands in ``out``.

    Returns the segments and a function to call after the read that moves whatever went through
    scratch memory into ``out`` (buffered I/O and aligned ``out`` need nothing, or only the last page).
    """
    header = memoryview(scratch.read_header)
    full, rest = divmod(len(out), PAGE)
    if not direct:
        return [header, out], lambda: None
    if is_aligned(out) or not full:
        tail = memoryview(scratch.tail)
        segments = [header, out[: full * PAGE]] + ([tail] if rest else [])

        def finish_tail() -> None:
            out[full * PAGE :] = tail[:rest]

        return segments, finish_tail
    bounce = scratch.bounce(round_up(len(out)))

    def finish_bounce() -> None:
        out[:] = bounce[: len(out)]

    return [header, bounce], finish_bounce


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def size_or_zero(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _advance(buffers: Sequence[memoryview], done: int) -> list[memoryview]:
    rest: list[memoryview] = []
    for buf in buffers:
        if done >= len(buf):
            done -= len(buf)
            continue
        rest.append(buf[done:])
        done = 0
    return rest


def pwrite_all(fd: int, buffers: Sequence[memoryview], offset: int) -> None:
    """Write every buffer at ``offset`` onwards, retrying short writes."""
    pending = [b for b in buffers if len(b)]
    while pending:
        written = os.pwritev(fd, pending, offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        pending = _advance(pending, written)


def pread_all(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
    """Fill the buffers from ``offset``; return the bytes read (less than asked only at end of file)."""
    pending = [b for b in buffers if len(b)]
    total = 0
    while pending:
        got = os.preadv(fd, pending, offset)
        if got <= 0:
            break
        total += got
        offset += got
        pending = _advance(pending, got)
    return total


def probe_o_direct(directory: str) -> str | None:
    """Try an aligned O_DIRECT write and read in ``directory``; return None if it works, else why not.

    Only EINVAL (the filesystem refuses the flag or the alignment) counts as "unsupported". A full
    filesystem cannot be probed; the open succeeded, so O_DIRECT is assumed to work. Other errors
    (permissions...) propagate as OSError.
    """
    if not O_DIRECT:
        return "this platform has no O_DIRECT"
    path = os.path.join(directory, f".odirect-probe.{secrets.token_hex(4)}.tmp")
    page = mmap.mmap(-1, PAGE)
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | O_DIRECT, 0o600)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return f"the filesystem refuses O_DIRECT opens ({exc.strerror})"
            raise
        try:
            page[:8] = b"kvtier\x00\x01"
            pwrite_all(fd, [memoryview(page)], 0)
            page[:8] = bytes(8)
            if pread_all(fd, [memoryview(page)], 0) != PAGE or page[:8] != b"kvtier\x00\x01":
                return "an O_DIRECT read did not return what was written"
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return f"the filesystem refuses aligned O_DIRECT I/O ({exc.strerror})"
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
        finally:
            os.close(fd)
        return None
    finally:
        page.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
