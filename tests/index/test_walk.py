"""The Score's first pass: the C walk (csrc/kvtier_walk.c) gives what the Python walk gives, for
every form of blocks, and both refuse malformed blocks with the same typed error."""

from __future__ import annotations

import random
import struct

import pytest

from kvtier.errors import InvalidRequestError
from kvtier.index import walk as walk_module
from kvtier.index.walk import walk_python


def c_walk():
    if not walk_module.native_available():
        pytest.skip("no C compiler or Python headers here: the index scores with the Python walk")
    return walk_module.walk


def hash_of(key: int, rng: random.Random) -> bytes:
    return struct.pack(">Q", key) + rng.randbytes(8)  # an index key is the hash's first 8 bytes


def forms(keys: list[int], rng: random.Random) -> list[object]:
    hashes = [hash_of(key, rng) for key in keys]
    return [keys, hashes, b"".join(hashes), [block[:8] for block in hashes]]


def test_the_c_walk_matches_the_python_walk_on_random_tables() -> None:
    walk = c_walk()
    rng = random.Random(7)
    for _ in range(300):
        universe = [rng.getrandbits(64) for _ in range(rng.randint(0, 40))]
        # Masks drawn from a few values, so runs of equal masks (and big ints past 64 bits) occur.
        values = [rng.getrandbits(rng.choice((3, 70, 200))) | 1 for _ in range(3)]
        table = {key: rng.choice(values) for key in universe if rng.random() < 0.8}
        prompt = rng.sample(universe, k=rng.randint(0, len(universe))) + [rng.getrandbits(64) for _ in range(rng.randint(0, 2))]
        # Mostly held prefixes: sort so the held keys come first sometimes.
        if rng.random() < 0.5:
            prompt.sort(key=lambda key: key not in table)
        for blocks in forms(prompt, rng):
            assert walk(table, blocks) == walk_python(table, blocks)


def test_the_walk_reports_change_points_and_the_held_prefix() -> None:
    table = {1: 5, 2: 5, 3: 7, 5: 5}
    for walk in {walk_python, walk_module.walk}:
        assert walk(table, [1, 2, 3, 4, 5]) == (3, [0, 2], [5, 7])
        assert walk(table, [4, 1]) == (0, [], [])
        assert walk(table, []) == (0, [], [])
        assert walk(table, b"") == (0, [], [])


@pytest.mark.parametrize("blocks", [
    b"\x00" * 17,                           # joined hashes not a multiple of 16 bytes
    [b"\x00" * 16, b"\x00" * 5],            # a hash of neither 16 nor 8 bytes
    [b"\x00" * 16, b"\x00" * 16, b"x" * 3],  # ... even past the held prefix
])
def test_malformed_blocks_are_refused_by_both_walks(blocks: object) -> None:
    table = {0: 1}
    for walk in {walk_python, walk_module.walk}:
        with pytest.raises(InvalidRequestError, match="16"):
            walk(table, blocks)


def test_the_c_walk_refuses_what_is_neither_a_hash_nor_a_key() -> None:
    walk = c_walk()
    with pytest.raises(InvalidRequestError, match="hash .*or an index key"):
        walk({1: 1}, [1, "two"])
    with pytest.raises(InvalidRequestError, match="bytes or a list"):
        walk({1: 1}, (1, 2))
