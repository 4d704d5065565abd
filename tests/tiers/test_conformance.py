"""The tier contract (kvtier/tiers/base.py), run against every backend: host memory, disk in a
temporary folder, and S3 on a real moto_server reached over HTTP."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from kvtier.blocks.checksum import payload_checksum
from kvtier.blocks.keys import BlockKey
from kvtier.config import DiskTierConfig, HostTierConfig
from kvtier.errors import CorruptBlockError
from kvtier.tiers.base import PutRequest, Tier
from kvtier.tiers.registry import create_tier

LAYOUT_A = "00000000000000aa"
LAYOUT_B = "00000000000000bb"


def key(n: int, layout: str = LAYOUT_A) -> BlockKey:
    return BlockKey(layout, n.to_bytes(16, "big"))


def payload(n: int, size: int) -> bytes:
    return (n.to_bytes(4, "little") * (size // 4 + 1))[:size] if size else b""


@pytest.fixture(params=["host", "disk", pytest.param("s3", marks=pytest.mark.s3)])
def tier(request: pytest.FixtureRequest, tmp_path) -> Iterator[Tier]:
    kind = request.param
    if kind == "host":
        settings = HostTierConfig(capacity="64MiB", slab_size="8MiB")
    elif kind == "disk":
        settings = DiskTierConfig(path=tmp_path / "disk", capacity="1GiB")
    else:
        settings = request.getfixturevalue("s3_settings")
    tier = create_tier(kind, settings)
    yield tier
    tier.close()


def put(tier: Tier, k: BlockKey, data: bytes) -> None:
    tier.put(k, data, payload_checksum(data))


@pytest.mark.parametrize("size", [1, 4096, 65537, 1 << 20])
def test_round_trip(tier: Tier, size: int) -> None:
    data = payload(size, size)
    put(tier, key(1), data)
    assert tier.get(key(1)) == data
    out = bytearray(size)
    assert tier.read_into(key(1), memoryview(out))
    assert bytes(out) == data


def test_absent_key_is_a_miss(tier: Tier) -> None:
    assert tier.get(key(99)) is None
    assert not tier.contains(key(99))
    assert not tier.read_into(key(99), memoryview(bytearray(16)))
    assert tier.delete(key(99)) is False


def test_delete(tier: Tier) -> None:
    put(tier, key(2), b"x" * 100)
    assert tier.contains(key(2))
    assert tier.delete(key(2)) is True
    assert not tier.contains(key(2))
    assert tier.get(key(2)) is None


def test_put_replaces(tier: Tier) -> None:
    put(tier, key(3), b"a" * 5000)
    put(tier, key(3), b"b" * 6000)
    assert tier.get(key(3)) == b"b" * 6000
    assert [s.nbytes for s in tier.scan() if s.key == key(3)] == [6000]


def test_layouts_are_separate(tier: Tier) -> None:
    put(tier, key(4, LAYOUT_A), b"A" * 64)
    put(tier, key(4, LAYOUT_B), b"B" * 128)
    assert tier.get(key(4, LAYOUT_A)) == b"A" * 64
    assert tier.get(key(4, LAYOUT_B)) == b"B" * 128
    tier.delete(key(4, LAYOUT_A))
    assert tier.get(key(4, LAYOUT_B)) == b"B" * 128


def test_read_into_wrong_size_is_refused(tier: Tier) -> None:
    put(tier, key(5), b"z" * 1000)
    with pytest.raises(CorruptBlockError):
        tier.read_into(key(5), memoryview(bytearray(999)))


def test_scan_lists_everything(tier: Tier) -> None:
    sizes = {key(i): 1000 + i for i in range(20)}
    for k, size in sizes.items():
        put(tier, k, payload(size, size))
    assert {s.key: s.nbytes for s in tier.scan()} == sizes


def test_batches(tier: Tier) -> None:
    requests = [PutRequest(key(i), payload(i, 3000 + i), payload_checksum(payload(i, 3000 + i))) for i in range(32)]
    assert tier.put_many(requests) == [None] * 32
    keys = [r.key for r in requests] + [key(1000)]
    got = tier.get_many(keys)
    assert got[:-1] == [bytes(r.payload) for r in requests]
    assert got[-1] is None
    assert tier.contains_many(keys) == [True] * 32 + [False]


def test_concurrent_writers_and_readers(tier: Tier) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(15):
                n = worker * 1000 + i
                data = os.urandom(8192 + i)
                put(tier, key(n), data)
                assert tier.get(key(n)) == data
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(list(tier.scan())) == 6 * 15
