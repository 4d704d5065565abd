"""Block keys: the identity a tier stores a block under, ``(layout_id, block_hash)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from kvtier.blocks.hashing import BLOCK_HASH_BYTES
from kvtier.blocks.layout import check_layout_id
from kvtier.errors import InvalidRequestError, LayoutError


class _BlockKeyFields(NamedTuple):
    layout_id: str
    block_hash: bytes


class BlockKey(_BlockKeyFields):
    """A block of one layout. ``str(key)`` is ``"<layout_id>/<32 hex digits>"``, used in paths and object keys.

    A tuple underneath, so hashing and comparing keys (every dict and policy lookup in the
    chain) runs in C; construction checks both fields.
    """

    __slots__ = ()

    def __new__(cls, layout_id: str, block_hash: bytes) -> BlockKey:
        if not _is_block_hash(block_hash):
            raise InvalidRequestError(f"block hash must be {BLOCK_HASH_BYTES} bytes, got {_described(block_hash)}")
        check_layout_id(layout_id)
        return tuple.__new__(cls, (layout_id, block_hash))

    @property
    def hash_hex(self) -> str:
        return self.block_hash.hex()

    def __str__(self) -> str:
        return f"{self.layout_id}/{self.block_hash.hex()}"

    def __repr__(self) -> str:
        return f"BlockKey({self.layout_id!r}, {self.block_hash!r})"


def _is_block_hash(value: object) -> bool:
    return type(value) is bytes and len(value) == BLOCK_HASH_BYTES


def _described(value: object) -> str:
    return f"{len(value)} bytes" if isinstance(value, bytes) else f"a {type(value).__name__}"


def block_key_of(text: str) -> BlockKey:
    """Parse ``"<layout_id>/<hash hex>"`` back into a key; raises InvalidRequestError on bad text."""
    layout_id, sep, hash_hex = text.partition("/")
    try:
        if not sep:
            raise ValueError("missing '/'")
        return BlockKey(layout_id, bytes.fromhex(hash_hex))
    except (ValueError, LayoutError) as exc:
        raise InvalidRequestError(f"not a block key: {text!r} ({exc})") from exc


def keys_for(layout_id: str, block_hashes: Sequence[bytes]) -> list[BlockKey]:
    """Keys of many blocks of one layout, checked once for the batch (cheaper than one by one).

    Raises :class:`InvalidRequestError` naming the first hash that is not ``BLOCK_HASH_BYTES`` bytes."""
    check_layout_id(layout_id)
    for index, block_hash in enumerate(block_hashes):
        if not _is_block_hash(block_hash):
            raise InvalidRequestError(f"block hash #{index} is {_described(block_hash)}; kvtier block hashes are {BLOCK_HASH_BYTES} bytes")
    make = tuple.__new__
    return [make(BlockKey, (layout_id, block_hash)) for block_hash in block_hashes]
