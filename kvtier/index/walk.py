"""The first pass of a Score: look a prompt's blocks up in a space's ``key -> holder mask`` table
and report where the holders change.

``walk(table, blocks) -> (held, points, masks)``: ``held`` is the number of leading blocks present
in ``table``; ``points`` are 0 and every ``i < held`` whose mask differs from block ``i-1``'s (none
when ``held`` is 0); ``masks`` the masks at those points. ``blocks`` is the prompt's 16-byte
block hashes concatenated, a list of hashes (16 bytes, or 8-byte index keys), or a list of index
keys (:func:`kvtier.events.model.index_key`).

``csrc/kvtier_walk.c`` does this in one C call (built on first use by :mod:`kvtier.native`);
:func:`walk_python` is the same walk in Python, used where the extension cannot be built
(``tests/index/test_walk.py`` compares the two). Either way malformed blocks raise
:class:`~kvtier.errors.InvalidRequestError`, whatever the table holds.
"""

from __future__ import annotations

import functools
from itertools import compress, repeat
from operator import ne
from types import ModuleType

from kvtier import native
from kvtier.errors import InvalidRequestError
from kvtier.events.model import index_keys, index_keys_of_joined

Blocks = bytes | list[bytes] | list[int]
WalkResult = tuple[int, list[int], list[int]]


def walk_python(table: dict[int, int], blocks: Blocks) -> WalkResult:
    if isinstance(blocks, bytes):
        keys = index_keys_of_joined(blocks)
    elif any(isinstance(block, bytes) for block in blocks):
        keys = index_keys(blocks)
    else:
        keys = blocks
    # C-level passes (a mask is never 0: a key nobody holds is deleted from the table).
    masks = list(map(table.get, keys, repeat(0, len(keys))))
    try:
        held = masks.index(0)
    except ValueError:
        held = len(masks)
    if not held:
        return 0, [], []
    points = [0, *compress(range(1, held), map(ne, masks[1:held], masks[: held - 1]))]
    return held, points, [masks[point] for point in points]


@functools.cache
def _extension() -> ModuleType | None:
    return native.load_extension("kvtier_walk.c", "_kvtier_walk")


def native_available() -> bool:
    """Whether :func:`walk` runs in C (building the extension on the first call)."""
    return _extension() is not None


def walk(table: dict[int, int], blocks: Blocks) -> WalkResult:
    extension = _extension()
    if extension is None:
        return walk_python(table, blocks)
    try:
        return extension.walk(table, blocks)
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(str(exc)) from None


__all__ = ["Blocks", "native_available", "walk", "walk_python"]
