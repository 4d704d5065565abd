"""Block hashes and layout ids: spec vectors, an independent re-implementation, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.blocks import BlockKey, HashExtras, KVLayout, MultimodalItem, PrefixHasher, block_key_of, hash_prompt
from kvtier.errors import InvalidRequestError, LayoutError

VECTORS = json.loads((Path(__file__).parents[2] / "docs" / "block-identity-vectors.json").read_text())


def extras_of(spec: dict) -> HashExtras:
    return HashExtras(
        lora_name=spec.get("lora_name"),
        cache_salt=spec.get("cache_salt"),
        multimodal=tuple(MultimodalItem(**m) for m in spec.get("multimodal", [])),
    )


def spec_hashes(tokens: list[int], block_size: int, extras: dict) -> list[str]:
    """docs/block-identity.md, implemented from the page alone."""
    out, parent = [], bytes(16)
    for i in range(len(tokens) // block_size):
        start, end = i * block_size, (i + 1) * block_size
        fields = []
        if "lora_name" in extras:
            fields.append((1, extras["lora_name"].encode()))
        if "cache_salt" in extras and i == 0:
            fields.append((2, extras["cache_salt"].encode()))
        mm = [m for m in extras.get("multimodal", []) if m["offset"] < end and m["offset"] + m["length"] > start]
        for m in sorted(mm, key=lambda m: (m["offset"], m["identifier"])):
            fields.append((3, struct.pack("<QQ", m["offset"], m["length"]) + m["identifier"].encode()))
        msg = b"KVTB\x01" + parent + struct.pack("<I", block_size)
        msg += b"".join(struct.pack("<I", t) for t in tokens[start:end])
        msg += struct.pack("<I", len(fields))
        msg += b"".join(struct.pack("<BI", tag, len(p)) + p for tag, p in fields)
        parent = hashlib.sha256(msg).digest()[:16]
        out.append(parent.hex())
    return out


@pytest.mark.parametrize("case", VECTORS["block_hashes"], ids=lambda c: c["name"])
def test_vectors(case: dict) -> None:
    got = [h.hex() for h in hash_prompt(case["token_ids"], case["block_size"], extras_of(case["extras"]))]
    assert got == case["block_hashes"]
    assert spec_hashes(case["token_ids"], case["block_size"], case["extras"]) == case["block_hashes"]


@pytest.mark.parametrize("case", VECTORS["layouts"], ids=lambda c: c["layout_id"])
def test_layout_vectors(case: dict) -> None:
    descriptor = {k: v for k, v in case["descriptor"].items() if k != "v"}
    descriptor["extra"] = tuple(tuple(pair) for pair in descriptor["extra"])
    layout = KVLayout(**descriptor)
    assert layout.canonical_json().decode() == case["canonical_json"]
    assert layout.layout_id == case["layout_id"]
    assert hashlib.sha256(case["canonical_json"].encode()).hexdigest()[:16] == case["layout_id"]
    assert layout.block_nbytes == case["block_nbytes"]


def test_same_across_processes_and_hash_seeds() -> None:
    code = (
        "from kvtier.blocks import hash_prompt, HashExtras, KVLayout;"
        "print([h.hex() for h in hash_prompt(list(range(64)), 16, HashExtras(lora_name='l', cache_salt='s'))],"
        "KVLayout(model='m', dtype='float16', num_layers=2, num_kv_heads=1, head_size=8, block_size=16).layout_id)"
    )
    outputs = set()
    for seed in ("0", "1", "12345", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
        outputs.add(result.stdout)
    assert len(outputs) == 1


def test_chain_and_extras_change_hashes() -> None:
    tokens = list(range(32))
    base = hash_prompt(tokens, 8)
    assert len(base) == 4 and len(set(base)) == 4
    assert hash_prompt(tokens[:16], 8) == base[:2]  # prefix property
    changed = hash_prompt([99] + tokens[1:], 8)
    assert all(a != b for a, b in zip(base, changed))  # a change propagates down the chain
    salted = hash_prompt(tokens, 8, HashExtras(cache_salt="tenant"))
    assert all(a != b for a, b in zip(base, salted))
    lora = hash_prompt(tokens, 8, HashExtras(lora_name="a"))
    assert lora != hash_prompt(tokens, 8, HashExtras(lora_name="b"))
    image = hash_prompt(tokens, 8, HashExtras(multimodal=(MultimodalItem("img", 20, 4),)))
    assert image[:2] == base[:2] and image[2] != base[2]  # blocks before the item are shared


def test_bad_input() -> None:
    with pytest.raises(InvalidRequestError):
        hash_prompt([-1, 2], 2)
    with pytest.raises(InvalidRequestError):
        hash_prompt([2**32, 2], 2)
    with pytest.raises(InvalidRequestError):
        hash_prompt([1, 2], 0)
    with pytest.raises(InvalidRequestError):
        block_key_of("nothex/00")
    with pytest.raises(LayoutError):
        KVLayout(model="m", dtype="float64", num_layers=1, num_kv_heads=1, head_size=1, block_size=1)
    with pytest.raises(LayoutError):
        KVLayout(model="m", dtype="float16", num_layers=1, num_kv_heads=1, head_size=1, block_size=1, tp_rank=2, tp_size=2)


def test_key_text_round_trip() -> None:
    key = BlockKey("0123456789abcdef", bytes(range(16)))
    assert block_key_of(str(key)) == key


def test_layout_fields_all_matter() -> None:
    base = dict(model="m", dtype="bfloat16", num_layers=4, num_kv_heads=8, head_size=64, block_size=16)
    variants = [
        {}, {"model": "m2"}, {"dtype": "float16"}, {"num_layers": 5}, {"num_kv_heads": 4}, {"head_size": 128},
        {"block_size": 32}, {"tp_size": 2}, {"tp_size": 2, "tp_rank": 1}, {"pp_size": 2}, {"page_layout": "BLHNC"},
        {"kv_format": "mla"}, {"model_revision": "r2"}, {"head_size_v": 32}, {"extra": (("cache_dtype_scale", "1.0"),)},
    ]
    ids = {KVLayout(**{**base, **v}).layout_id for v in variants}
    assert len(ids) == len(variants)


def test_prefix_hasher_matches_hash_prompt() -> None:
    extras = HashExtras(lora_name="l", cache_salt="s", multimodal=(MultimodalItem("img", 30, 8),))
    tokens = list(range(100))
    hasher = PrefixHasher(8, extras)
    for end in (3, 8, 20, 41, 100):
        hasher.update(tokens[:end])
    assert hasher.hashes == hash_prompt(tokens, 8, extras)


@pytest.mark.parametrize("extras", [HashExtras(), HashExtras(lora_name="l"), HashExtras(cache_salt="s"), HashExtras("l", "s")],
                         ids=["plain", "lora", "salt", "lora+salt"])
def test_prefix_hasher_on_text_matches_the_spec_block_by_block(extras: HashExtras) -> None:
    """Text-only prompts hash their new blocks in one pass (in C past a length): the same bytes
    as the spec's one block at a time, the cache salt in block 0 only, over growing updates."""
    from kvtier.blocks.hashing import ROOT_PARENT, _extra_fields, hash_block

    tokens = [(i * 7919) % 50_000 for i in range(16 * 300)]
    expected, parent = [], ROOT_PARENT
    for index in range(len(tokens) // 16):
        parent = hash_block(parent, tokens[index * 16:(index + 1) * 16], _extra_fields(extras, index, index * 16, (index + 1) * 16))
        expected.append(parent)
    hasher = PrefixHasher(16, extras)
    for end in (5, 16, 40, 16 * 200 + 3, 16 * 201, len(tokens)):  # one block, a few, a long run, one more, the rest
        assert hasher.update(tokens[:end]) == expected[: end // 16]


def test_the_c_hasher_gives_the_same_bytes_as_the_spec() -> None:
    """Long prompts go through csrc/kvtier_hash.c where it builds; its hashes equal block by block ones."""
    import random

    from kvtier.blocks import fasthash
    from kvtier.blocks.hashing import ROOT_PARENT, HashExtras, _extra_fields, hash_block, hash_prompt

    if not fasthash.available():
        pytest.skip("no C compiler or OpenSSL headers here: the Python path serves")
    rng = random.Random(3)
    tokens = [rng.randrange(2**32) for _ in range(16 * 100 + 7)]
    for extras in (HashExtras(), HashExtras(lora_name="adapter"), HashExtras(cache_salt="tenant"), HashExtras("a", "t")):
        expected, parent = [], ROOT_PARENT
        for i in range(100):
            parent = hash_block(parent, tokens[i * 16:(i + 1) * 16], _extra_fields(extras, i, i * 16, (i + 1) * 16))
            expected.append(parent)
        assert hash_prompt(tokens, 16, extras) == expected
