"""The block-hash chain in C, for routers and the index: thousands of blocks per query.

``csrc/kvtier_hash.c`` is compiled on first use against OpenSSL's libcrypto (:mod:`kvtier.native`)
and loaded with ctypes. Where there is no compiler or no libcrypto headers, or on a
big-endian host, :func:`chain` returns None and callers use the Python implementation, which
produces the same bytes (``tests/blocks/test_hashing.py`` checks both against the spec vectors).
"""

from __future__ import annotations

import ctypes
import logging
import threading

from kvtier import native

log = logging.getLogger(__name__)

_lock = threading.Lock()
_function: ctypes._CFuncPtr | None = None
_tried = False


def _build() -> ctypes._CFuncPtr | None:
    library = native.build("kvtier_hash.c", "libkvtier_hash", ["-Wno-deprecated-declarations"], ["crypto"])
    if library is None:
        return None
    function = ctypes.CDLL(str(library)).kvtier_hash_chain
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64,
                         ctypes.c_char_p, ctypes.c_uint64, ctypes.c_void_p]
    return function


def available() -> bool:
    """Whether the C hasher is (or could now be) loaded; builds it on the first call."""
    global _function, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _function = _build()
                except OSError as exc:  # the library built but does not load
                    log.debug("the C block hasher is unavailable (%s); hashing in Python", exc)
                    _function = None
                _tried = True
    return _function is not None


def chain(tokens: bytes, blocks: int, block_size: int, parent: bytes, tail_first: bytes, tail_later: bytes) -> bytes | None:
    """The hashes of ``blocks`` blocks of little-endian u32 ``tokens``, concatenated (16 bytes
    each); None without the C hasher."""
    if not available() or blocks == 0:
        return None
    out = ctypes.create_string_buffer(16 * blocks)
    source = ctypes.c_char_p(tokens)
    if _function(source, blocks, block_size, parent, tail_first, len(tail_first), tail_later, len(tail_later), out) != 0:
        return None
    return out.raw
