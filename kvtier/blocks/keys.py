"""Block keys: the identity a tier stores a block under, ``(layout_id, block_hash)``."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.blocks.hashing import BLOCK_HASH_BYTES
from kvtier.blocks.layout import check_layout_id
from kvtier.errors import InvalidRequestError, LayoutError


@dataclass(frozen=True, slots=True, order=True)
class BlockKey:
    """A block of one layout. ``str(key)`` is ``"<layout_id>/<32 hex digits>"``, used in paths and object keys."""

    layout_id: str
    block_hash: bytes

    def __post_init__(self) -> None:
        if len(self.block_hash) != BLOCK_HASH_BYTES:
            raise InvalidRequestError(
                f"block hash must be {BLOCK_HASH_BYTES} bytes, got {len(self.block_hash)}"
            )
        check_layout_id(self.layout_id)

    @property
    def hash_hex(self) -> str:
        return self.block_hash.hex()

    def __str__(self) -> str:
        return f"{self.layout_id}/{self.block_hash.hex()}"


def make_block_key(layout_id: str, block_hash: bytes) -> BlockKey:
    return BlockKey(layout_id, bytes(block_hash))


def block_key_of(text: str) -> BlockKey:
    """Parse ``"<layout_id>/<hash hex>"`` back into a key; raises InvalidRequestError on bad text."""
    layout_id, sep, hash_hex = text.partition("/")
    try:
        if not sep:
            raise ValueError("missing '/'")
        return BlockKey(layout_id, bytes.fromhex(hash_hex))
    except (ValueError, LayoutError) as exc:
        raise InvalidRequestError(f"not a block key: {text!r} ({exc})") from exc


def keys_for(layout_id: str, block_hashes: list[bytes]) -> list[BlockKey]:
    return [BlockKey(layout_id, h) for h in block_hashes]
