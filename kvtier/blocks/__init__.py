"""Block identity: layouts, chained block hashes, keys, checksums and the stored record format."""

from kvtier.blocks.checksum import payload_checksum
from kvtier.blocks.hashing import (
    BLOCK_HASH_BYTES,
    ROOT_PARENT,
    HashExtras,
    MultimodalItem,
    PrefixHasher,
    hash_block,
    hash_prompt,
)
from kvtier.blocks.keys import BlockKey, block_key_of, keys_for
from kvtier.blocks.layout import KVLayout

__all__ = [
    "BLOCK_HASH_BYTES",
    "ROOT_PARENT",
    "BlockKey",
    "HashExtras",
    "KVLayout",
    "MultimodalItem",
    "PrefixHasher",
    "block_key_of",
    "hash_block",
    "hash_prompt",
    "keys_for",
    "payload_checksum",
]
