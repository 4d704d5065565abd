"""A router's queries, checked and answered the same way whatever transport carried them.

The gRPC servicer (:mod:`kvtier.index.service`) and the fast path (:mod:`kvtier.index.fast_server`)
both turn a request into a call here, so a malformed query gets the same
:class:`~kvtier.errors.InvalidRequestError` message on either. Long inputs may come packed:
block hashes as one ``bytes`` of 16-byte hashes, token ids as little-endian ``uint32`` bytes
(:func:`pack_token_ids`); they then reach the index's walk and the hasher without one Python
object per block or token.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import NamedTuple

from kvtier.blocks.hashing import BLOCK_HASH_BYTES, HashExtras
from kvtier.errors import InvalidRequestError
from kvtier.events.model import Space, index_keys, index_keys_of_joined
from kvtier.index.base import Holding, KVIndex, NodeScore

MAX_PROMPT_BLOCKS = 1 << 20

BlockHashes = bytes | Sequence[bytes]  # joined 16-byte hashes, or one hash (or 8-byte key) each
TokenIds = Sequence[int]  # a list, or the array of unpack_token_ids


class ScoreAnswer(NamedTuple):
    scores: list[NodeScore]  # best first; nodes holding nothing are left out
    prompt_blocks: int
    block_size: int


def pack_token_ids(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian ``uint32`` bytes (the packed form of a query's token ids)."""
    try:
        packed = array("I", token_ids)
    except (OverflowError, TypeError) as exc:
        raise InvalidRequestError(f"token ids must be integers in 0..{2**32 - 1} ({exc})") from None
    if sys.byteorder != "little":  # pragma: no cover - kvtier runs on little-endian machines
        packed.byteswap()
    return packed.tobytes()


def unpack_token_ids(data: bytes) -> array:
    if len(data) % 4:
        raise InvalidRequestError(f"packed token ids are 4 bytes each; got {len(data)} bytes")
    token_ids = array("I")
    token_ids.frombytes(data)
    if sys.byteorder != "little":  # pragma: no cover
        token_ids.byteswap()
    return token_ids


def _checked_hashes(block_hashes: BlockHashes) -> tuple[bytes | list[bytes], int]:
    """The hashes as the index's walk takes them (joined bytes, or a list), and how many there are."""
    if isinstance(block_hashes, bytes):
        if len(block_hashes) % BLOCK_HASH_BYTES:
            raise InvalidRequestError(f"packed block hashes are {BLOCK_HASH_BYTES} bytes each; got {len(block_hashes)} bytes")
        blocks, count = block_hashes, len(block_hashes) // BLOCK_HASH_BYTES
    else:
        blocks, count = list(block_hashes), len(block_hashes)
    if count > MAX_PROMPT_BLOCKS:
        raise InvalidRequestError(f"at most {MAX_PROMPT_BLOCKS} block hashes per query")
    return blocks, count


def space_of(index: KVIndex, model: str, block_size: int) -> Space:
    """The space a query names; ``block_size`` 0 means the one the index knows for ``model``."""
    if not model:
        raise InvalidRequestError("model is required")
    if block_size < 0:
        raise InvalidRequestError(f"block_size must not be negative, got {block_size}")
    return index.space_of(model, block_size or None)


def score(
    index: KVIndex,
    model: str,
    block_size: int = 0,
    *,
    token_ids: TokenIds = (),
    block_hashes: BlockHashes = (),
    lora_name: str = "",
    cache_salt: str = "",
    candidates: Sequence[str] = (),
) -> ScoreAnswer:
    """Score a prompt given by its token ids (hashed here with kvtier's spec, LoRA name and cache
    salt folded in) or by its block hashes (which already include them)."""
    space = space_of(index, model, block_size)
    if len(token_ids) and len(block_hashes):
        raise InvalidRequestError("send token_ids or block_hashes, not both")
    wanted = list(candidates) or None
    if len(block_hashes):
        if lora_name or cache_salt:
            raise InvalidRequestError("lora_name and cache_salt apply to token_ids; block hashes already include them")
        blocks, prompt_blocks = _checked_hashes(block_hashes)
        return ScoreAnswer(index.score_blocks(space, blocks, wanted), prompt_blocks, space.block_size)
    if len(token_ids) > MAX_PROMPT_BLOCKS * space.block_size:
        raise InvalidRequestError("too many token ids for one query")
    extras = HashExtras(lora_name=lora_name or None, cache_salt=cache_salt or None)
    scores = index.score_tokens(space.model, token_ids, block_size=space.block_size, extras=extras, candidates=wanted)
    return ScoreAnswer(scores, len(token_ids) // space.block_size, space.block_size)


def lookup(index: KVIndex, model: str, block_size: int, block_hashes: BlockHashes) -> list[list[Holding]]:
    """For each block hash, the live nodes and tiers holding it."""
    space = space_of(index, model, block_size)
    blocks, _ = _checked_hashes(block_hashes)
    keys = index_keys_of_joined(blocks) if isinstance(blocks, bytes) else index_keys(blocks)
    return index.lookup(space, keys)
