"""kvtier's chained block hash over token ids. Byte-level spec: ``docs/block-identity.md``.

The hash of block ``i`` covers the digest of block ``i-1`` (16 zero bytes for the first block),
the block's token ids and its extra keys, so a block hash identifies the whole prefix up to and
including that block. It is SHA-256 over a fixed little-endian encoding, truncated to 128 bits:
it does not depend on ``PYTHONHASHSEED``, the process, the host or vLLM's hash settings, and a
router in any language can compute it from a tokenized prompt.

Only full blocks are hashed; a trailing partial block has no hash and is never cached.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvtier.errors import InvalidRequestError

BLOCK_HASH_BYTES = 16
ROOT_PARENT = bytes(BLOCK_HASH_BYTES)
_MAGIC = b"KVTB\x01"  # "KVTB" + spec version 1
_MAX_TOKEN_ID = 2**32 - 1

_C_HASH_MIN_BLOCKS = 32  # below this the Python loop costs less than the call into C

TAG_LORA = 1
TAG_CACHE_SALT = 2
TAG_MULTIMODAL = 3


@dataclass(frozen=True, slots=True)
class MultimodalItem:
    """A multimodal input occupying ``length`` placeholder tokens from prompt position ``offset``."""

    identifier: str  # the content hash of the item (e.g. vLLM's mm_hash)
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class HashExtras:
    """Per-prompt inputs that change the KV of otherwise equal tokens.

    ``lora_name`` applies to every block, ``cache_salt`` (tenant isolation) to the first block only
    (the chain carries it to every later block), multimodal items to the blocks they overlap.
    """

    lora_name: str | None = None
    cache_salt: str | None = None
    multimodal: tuple[MultimodalItem, ...] = ()


NO_EXTRAS = HashExtras()


def _field(tag: int, payload: bytes) -> bytes:
    return struct.pack("<BI", tag, len(payload)) + payload


def _extra_fields(extras: HashExtras, block_index: int, start: int, end: int) -> list[bytes]:
    fields: list[bytes] = []
    if extras.lora_name is not None:
        fields.append(_field(TAG_LORA, extras.lora_name.encode()))
    if extras.cache_salt is not None and block_index == 0:
        fields.append(_field(TAG_CACHE_SALT, extras.cache_salt.encode()))
    overlapping = [m for m in extras.multimodal if m.offset < end and m.offset + m.length > start]
    for item in sorted(overlapping, key=lambda m: (m.offset, m.identifier)):
        payload = struct.pack("<QQ", item.offset, item.length) + item.identifier.encode()
        fields.append(_field(TAG_MULTIMODAL, payload))
    return fields


def hash_block(parent: bytes, token_ids: Sequence[int], extra_fields: Iterable[bytes] = ()) -> bytes:
    """Return the 16-byte hash of one block given its parent's hash and its token ids.

    ``extra_fields`` are already-encoded ``tag u8 | length u32le | bytes`` fields in spec order.
    """
    if len(parent) != BLOCK_HASH_BYTES:
        raise InvalidRequestError(f"parent hash must be {BLOCK_HASH_BYTES} bytes, got {len(parent)}")
    fields = list(extra_fields)
    try:
        tokens = struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error as exc:
        raise InvalidRequestError(
            f"token ids must be integers in 0..{_MAX_TOKEN_ID}; got one outside that range ({exc})"
        ) from exc
    digest = hashlib.sha256()
    digest.update(_MAGIC)
    digest.update(parent)
    digest.update(struct.pack("<I", len(token_ids)))
    digest.update(tokens)
    digest.update(struct.pack("<I", len(fields)))
    for encoded in fields:
        digest.update(encoded)
    return digest.digest()[:BLOCK_HASH_BYTES]


def hash_prompt(
    token_ids: Sequence[int],
    block_size: int,
    extras: HashExtras = NO_EXTRAS,
    parent: bytes = ROOT_PARENT,
) -> list[bytes]:
    """Return the chained hashes of every full block of ``token_ids`` (partial tail ignored)."""
    if block_size <= 0:
        raise InvalidRequestError(f"block_size must be positive, got {block_size}")
    blocks = len(token_ids) // block_size
    if extras.multimodal or not blocks:
        hashes: list[bytes] = []
        for index in range(blocks):
            start, end = index * block_size, (index + 1) * block_size
            parent = hash_block(parent, token_ids[start:end], _extra_fields(extras, index, start, end))
            hashes.append(parent)
        return hashes
    joined = _hash_text_blocks(token_ids, block_size, blocks, extras, parent)
    return [joined[i:i + BLOCK_HASH_BYTES] for i in range(0, len(joined), BLOCK_HASH_BYTES)]


def hash_prompt_joined(token_ids: Sequence[int], block_size: int, extras: HashExtras = NO_EXTRAS) -> bytes:
    """:func:`hash_prompt`'s hashes concatenated (16 bytes each): what the index turns into keys
    without building one object per block."""
    if block_size <= 0:
        raise InvalidRequestError(f"block_size must be positive, got {block_size}")
    blocks = len(token_ids) // block_size
    if extras.multimodal or not blocks:
        return b"".join(hash_prompt(token_ids, block_size, extras))
    return _hash_text_blocks(token_ids, block_size, blocks, extras, ROOT_PARENT)


def _hash_text_blocks(token_ids: Sequence[int], block_size: int, blocks: int, extras: HashExtras, parent: bytes) -> bytes:
    """The hashes of a prompt without multimodal items, concatenated: the same bytes, one SHA-256
    call per block over a message joined from pre-encoded parts, or all of them in C
    (:mod:`kvtier.blocks.fasthash`) for long prompts (routers hash thousands of blocks per query)."""
    if len(parent) != BLOCK_HASH_BYTES:
        raise InvalidRequestError(f"parent hash must be {BLOCK_HASH_BYTES} bytes, got {len(parent)}")
    try:
        encoded = array("I", token_ids[: blocks * block_size])
    except (OverflowError, TypeError) as exc:
        raise InvalidRequestError(f"token ids must be integers in 0..{_MAX_TOKEN_ID}; got one outside that range ({exc})") from exc
    if encoded.itemsize != 4:  # pragma: no cover - every platform kvtier runs on has 4-byte unsigned ints
        return b"".join(hash_prompt(list(token_ids), block_size, HashExtras(extras.lora_name, extras.cache_salt, ()), parent))
    if sys.byteorder != "little":  # pragma: no cover
        encoded.byteswap()
    data = encoded.tobytes()
    size = struct.pack("<I", block_size)
    later = _fields_tail(_extra_fields(HashExtras(extras.lora_name), 1, 0, 0))
    first = _fields_tail(_extra_fields(extras, 0, 0, 0)) if extras.cache_salt is not None else later
    if blocks >= _C_HASH_MIN_BLOCKS:
        from kvtier.blocks import fasthash

        hashed = fasthash.chain(data, blocks, block_size, parent, first, later)
        if hashed is not None:
            return hashed
    step = 4 * block_size
    sha256 = hashlib.sha256
    hashes = []
    for index in range(blocks):
        tail = first if index == 0 else later
        parent = sha256(b"".join((_MAGIC, parent, size, data[index * step:(index + 1) * step], tail))).digest()[:BLOCK_HASH_BYTES]
        hashes.append(parent)
    return b"".join(hashes)


def _fields_tail(fields: list[bytes]) -> bytes:
    return struct.pack("<I", len(fields)) + b"".join(fields)


class PrefixHasher:
    """Incremental :func:`hash_prompt` for a growing token sequence (prompt, then generated tokens).

    ``update(tokens)`` hashes the full blocks of ``tokens`` not hashed yet and returns all hashes
    so far; ``tokens`` must extend the sequence seen by earlier calls.
    """

    def __init__(self, block_size: int, extras: HashExtras = NO_EXTRAS) -> None:
        if block_size <= 0:
            raise InvalidRequestError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.extras = extras
        self.hashes: list[bytes] = []

    def update(self, token_ids: Sequence[int]) -> list[bytes]:
        size = self.block_size
        parent = self.hashes[-1] if self.hashes else ROOT_PARENT
        done, blocks = len(self.hashes), len(token_ids) // size - len(self.hashes)
        if blocks > 0 and not self.extras.multimodal:
            # Text only: the new blocks in one pass (in C for long runs), not one call per block.
            extras = self.extras if done == 0 else HashExtras(self.extras.lora_name)  # the salt is block 0's
            joined = _hash_text_blocks(token_ids[done * size:(done + blocks) * size], size, blocks, extras, parent)
            self.hashes.extend(joined[i:i + BLOCK_HASH_BYTES] for i in range(0, len(joined), BLOCK_HASH_BYTES))
            return self.hashes
        for index in range(len(self.hashes), len(token_ids) // size):
            start, end = index * size, (index + 1) * size
            parent = hash_block(parent, token_ids[start:end], _extra_fields(self.extras, index, start, end))
            self.hashes.append(parent)
        return self.hashes

