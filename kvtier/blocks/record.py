"""The stored form of a block below the host tier: a 64-byte header followed by the payload.

Used by the disk tier (header padded to its I/O alignment) and the S3 tier (as is). Layout,
little-endian::

    offset size field
     0      8   magic  b"KVTBLK" + format version (u8, = 1) + reserved (u8, = 0)
     8      8   layout_id (the 16 hex digits as 8 raw bytes)
    16     16   block_hash
    32      8   payload length, u64
    40      8   payload checksum, XXH3-64 (see kvtier.blocks.checksum)
    48      8   creation time, unix nanoseconds, u64
    56      8   header checksum, XXH3-64 of bytes 0..56

A reader trusts nothing it has not checked: the magic, the header checksum, that the header
names the key it asked for, the length, and then the payload checksum.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import xxhash

from kvtier.blocks.checksum import payload_checksum
from kvtier.blocks.keys import BlockKey
from kvtier.errors import CorruptBlockError

RECORD_MAGIC = b"KVTBLK\x01\x00"
HEADER_NBYTES = 64
_HEADER = struct.Struct("<8s8s16sQQQ")  # 56 bytes, then the u64 header checksum


@dataclass(frozen=True, slots=True)
class RecordHeader:
    key: BlockKey
    payload_nbytes: int
    checksum: int
    created_ns: int


def encode_header(key: BlockKey, payload_nbytes: int, checksum: int, created_ns: int | None = None) -> bytes:
    """Return the 64 header bytes for a payload of ``payload_nbytes`` with ``checksum``."""
    body = _HEADER.pack(
        RECORD_MAGIC,
        bytes.fromhex(key.layout_id),
        key.block_hash,
        payload_nbytes,
        checksum,
        time.time_ns() if created_ns is None else created_ns,
    )
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def decode_header(raw: bytes | memoryview, *, tier: str, where: str) -> RecordHeader:
    """Parse and check a header; raise CorruptBlockError naming ``where`` when it is damaged."""
    if len(raw) < HEADER_NBYTES:
        raise CorruptBlockError(f"{where}: truncated header ({len(raw)} bytes)", tier=tier)
    body = bytes(raw[: _HEADER.size])
    (stored,) = struct.unpack_from("<Q", raw, _HEADER.size)
    if xxhash.xxh3_64_intdigest(body) != stored:
        raise CorruptBlockError(f"{where}: header checksum mismatch", tier=tier)
    magic, layout_raw, block_hash, nbytes, checksum, created_ns = _HEADER.unpack(body)
    if magic != RECORD_MAGIC:
        raise CorruptBlockError(f"{where}: not a kvtier block record (magic {magic!r})", tier=tier)
    return RecordHeader(BlockKey(layout_raw.hex(), block_hash), nbytes, checksum, created_ns)


def verify_payload(header: RecordHeader, expected_key: BlockKey, payload: bytes | memoryview, *, tier: str, where: str) -> None:
    """Raise CorruptBlockError unless ``payload`` is the block ``expected_key`` that ``header`` describes."""
    if header.key != expected_key:
        raise CorruptBlockError(f"{where}: holds {header.key}, expected {expected_key}", tier=tier)
    if len(payload) != header.payload_nbytes:
        raise CorruptBlockError(
            f"{where}: payload is {len(payload)} bytes, header says {header.payload_nbytes}", tier=tier
        )
    if payload_checksum(payload) != header.checksum:
        raise CorruptBlockError(f"{where}: payload checksum mismatch", tier=tier)
