"""S3-specific tests of S3Tier against a real moto_server (and a fault proxy in front of it).

The behaviour every tier shares is checked by the conformance suite; here: object layout, prefixes,
multipart, corruption, retries, timeouts and unreachable endpoints.
"""

from __future__ import annotations

import array
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kvtier.blocks.checksum import payload_checksum
from kvtier.blocks.keys import BlockKey
from kvtier.blocks.record import HEADER_NBYTES
from kvtier.config import S3TierConfig
from kvtier.errors import ConfigError, CorruptBlockError, TierUnavailableError
from kvtier.tiers.base import PutRequest, StoredBlock, Tier
from kvtier.tiers.registry import create_tier
from kvtier.tiers.s3 import S3Tier, object_key
from tests.servers import FaultProxy, free_port

pytestmark = [pytest.mark.s3, pytest.mark.timeout(60)]

LAYOUT = "0123456789abcdef"
OTHER_LAYOUT = "fedcba9876543210"
MiB = 1024 * 1024


def block_key(i: int, layout: str = LAYOUT) -> BlockKey:
    return BlockKey(layout, i.to_bytes(16, "big"))


def put(tier: Tier, key: BlockKey, payload: bytes) -> None:
    tier.put(key, payload, payload_checksum(payload))


def via(settings: S3TierConfig, proxy: FaultProxy, **update: Any) -> S3TierConfig:
    return settings.model_copy(update={"endpoint_url": proxy.endpoint_url, **update})


@pytest.fixture
def tier(s3_settings: S3TierConfig) -> Iterator[S3Tier]:
    t = S3Tier(s3_settings)
    yield t
    t.close()


# ---- round trips and layout -------------------------------------------------------------------


def test_round_trip_small(tier: S3Tier) -> None:
    key, payload = block_key(1), os.urandom(4096)
    assert tier.get(key) is None and not tier.contains(key)
    put(tier, key, payload)
    assert tier.contains(key)
    assert tier.get(key) == payload
    out = bytearray(len(payload))
    assert tier.read_into(key, memoryview(out)) and bytes(out) == payload
    assert tier.delete(key) is True
    assert tier.delete(key) is False
    assert tier.get(key) is None and not tier.contains(key)


def test_put_replaces_and_accepts_typed_buffers(tier: S3Tier) -> None:
    key = block_key(2)
    put(tier, key, b"first version")
    floats = array.array("f", [1.5, -2.25, 3.0, 4.125])  # a memoryview of 4-byte items
    view = memoryview(floats)
    tier.put(key, view, payload_checksum(view.cast("B")))
    assert tier.get(key) == floats.tobytes()
    assert tier.stored_nbytes(16) == 16 + HEADER_NBYTES


def test_round_trip_multipart(s3_settings: S3TierConfig, s3_client: Any) -> None:
    settings = s3_settings.model_copy(update={"multipart_threshold": 6 * MiB, "multipart_chunk_size": 5 * MiB})
    big, small = os.urandom(12 * MiB + 123), os.urandom(5 * MiB)
    with S3Tier(settings) as tier:
        put(tier, block_key(1), big)
        put(tier, block_key(2), small)
        assert tier.get(block_key(1)) == big
        assert tier.get(block_key(2)) == small
    head_big = s3_client.head_object(Bucket=settings.bucket, Key=object_key(settings.prefix, block_key(1)))
    head_small = s3_client.head_object(Bucket=settings.bucket, Key=object_key(settings.prefix, block_key(2)))
    assert head_big["ContentLength"] == len(big) + HEADER_NBYTES
    assert head_big["ETag"].strip('"').endswith("-3")  # a multipart ETag: three parts
    assert "-" not in head_small["ETag"]


@pytest.mark.parametrize(("prefix", "expected"), [("", ""), ("a/b", "a/b/"), ("/nested/p/", "nested/p/")])
def test_object_keys_under_prefix(s3_settings: S3TierConfig, s3_client: Any, prefix: str, expected: str) -> None:
    settings = s3_settings.model_copy(update={"prefix": S3TierConfig(prefix=prefix).prefix})
    key = block_key(7)
    with S3Tier(settings) as tier:
        put(tier, key, b"payload")
        assert [b.key for b in tier.scan()] == [key]
        assert tier.get(key) == b"payload"
    listed = [o["Key"] for o in s3_client.list_objects_v2(Bucket=settings.bucket)["Contents"]]
    assert listed == [f"{expected}{LAYOUT}/{key.hash_hex}"]


def test_scan_after_reopen_skips_foreign_objects(s3_settings: S3TierConfig, s3_client: Any) -> None:
    sizes = {block_key(i): 100 * i + 1 for i in range(5)} | {block_key(9, OTHER_LAYOUT): 3}
    with S3Tier(s3_settings) as tier:
        for key, size in sizes.items():
            put(tier, key, os.urandom(size))
    bucket, prefix = s3_settings.bucket, s3_settings.prefix
    for foreign in (f"{prefix}/README", f"{prefix}/{LAYOUT}/not-hex", f"{prefix}/{LAYOUT}/{'AB' * 16}", "elsewhere/x"):
        s3_client.put_object(Bucket=bucket, Key=foreign, Body=b"not a block")
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{LAYOUT}/{'ee' * 16}", Body=b"short")  # < header
    with S3Tier(s3_settings) as reopened:
        found = sorted(reopened.scan(), key=lambda b: b.key)
        assert found == sorted((StoredBlock(k, n) for k, n in sizes.items()), key=lambda b: b.key)
    other = s3_settings.model_copy(update={"prefix": "another-prefix"})
    with S3Tier(other) as unrelated:
        assert list(unrelated.scan()) == []


def test_create_tier_from_registry(s3_settings: S3TierConfig) -> None:
    with create_tier("s3", s3_settings, name="objects") as tier:
        assert isinstance(tier, S3Tier) and tier.name == "objects" and tier.capacity_bytes is None


# ---- damaged objects --------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [HEADER_NBYTES + 100, 20, -1], ids=["payload", "header", "last-byte"])
def test_flipped_byte_is_corrupt_and_kept(tier: S3Tier, s3_client: Any, offset: int) -> None:
    key = block_key(3)
    put(tier, key, os.urandom(1000))
    name = object_key(tier.prefix, key)
    raw = bytearray(s3_client.get_object(Bucket=tier.bucket, Key=name)["Body"].read())
    raw[offset] ^= 0x01
    s3_client.put_object(Bucket=tier.bucket, Key=name, Body=bytes(raw))
    with pytest.raises(CorruptBlockError) as info:
        tier.get(key)
    assert info.value.tier == "s3" and name in str(info.value)
    assert tier.contains(key)  # the chain deletes it, not the tier
    assert isinstance(tier.get_many([key])[0], CorruptBlockError)


def test_object_of_another_key_or_truncated_is_corrupt(tier: S3Tier, s3_client: Any) -> None:
    a, b, c = block_key(4), block_key(5), block_key(6)
    put(tier, a, b"block a")
    s3_client.copy_object(
        Bucket=tier.bucket,
        Key=object_key(tier.prefix, b),
        CopySource={"Bucket": tier.bucket, "Key": object_key(tier.prefix, a)},
    )
    with pytest.raises(CorruptBlockError, match="expected"):
        tier.get(b)
    s3_client.put_object(Bucket=tier.bucket, Key=object_key(tier.prefix, c), Body=b"tiny")
    with pytest.raises(CorruptBlockError, match="truncated"):
        tier.get(c)


# ---- parallel batches -------------------------------------------------------------------------


def test_parallel_put_many_get_many_64_blocks(tier: S3Tier) -> None:
    payloads = {block_key(i): os.urandom(64 * 1024 + i) for i in range(64)}
    requests = [PutRequest(k, p, payload_checksum(p)) for k, p in payloads.items()]
    assert tier.put_many(requests) == [None] * 64
    keys = list(payloads)
    missing = block_key(1000)
    results = tier.get_many([*keys, missing])
    for key, result in zip(keys, results):
        assert isinstance(result, bytes) and result == payloads[key], key
    assert results[-1] is None
    assert tier.contains_many([*keys, missing]) == [True] * 64 + [False]
    assert {b.key: b.nbytes for b in tier.scan()} == {k: len(p) for k, p in payloads.items()}


# ---- faults -----------------------------------------------------------------------------------


def test_throttling_is_retried_then_succeeds(s3_settings: S3TierConfig, s3_proxy: FaultProxy) -> None:
    with S3Tier(via(s3_settings, s3_proxy, max_attempts=4)) as tier:
        key, payload = block_key(1), os.urandom(2048)
        s3_proxy.set_mode("error_n_then_pass", n=3)
        before = s3_proxy.requests
        put(tier, key, payload)
        assert s3_proxy.requests - before == 4  # three 503 SlowDown answers, then the PUT
        s3_proxy.set_mode("error_n_then_pass", n=2)
        assert tier.get(key) == payload


def test_cut_off_body_is_fetched_again(s3_settings: S3TierConfig, s3_proxy: FaultProxy) -> None:
    with S3Tier(via(s3_settings, s3_proxy, max_attempts=3)) as tier:
        key, payload = block_key(1), os.urandom(256 * 1024)
        put(tier, key, payload)
        s3_proxy.set_mode("truncate_n_then_pass", n=2)
        before = s3_proxy.requests
        assert tier.get(key) == payload
        assert s3_proxy.requests - before == 3  # two cut-off bodies, then a whole one
        s3_proxy.set_mode("truncate_n_then_pass", n=3)
        with pytest.raises(TierUnavailableError, match="get"):
            tier.get(key)


def test_503_forever_is_unavailable(s3_settings: S3TierConfig, s3_proxy: FaultProxy) -> None:
    settings = via(s3_settings, s3_proxy, max_attempts=3)
    with S3Tier(settings) as tier:
        s3_proxy.set_mode("error_503")
        before = s3_proxy.requests
        start = time.monotonic()
        with pytest.raises(TierUnavailableError) as info:
            put(tier, block_key(1), b"x")
        assert time.monotonic() - start < 30
        assert s3_proxy.requests - before == 3  # bounded: max_attempts requests, no more
        message = str(info.value)
        assert s3_proxy.endpoint_url in message and settings.bucket in message and "SlowDown" in message
        with pytest.raises(TierUnavailableError):
            tier.get(block_key(1))
        with pytest.raises(TierUnavailableError):
            tier.contains(block_key(1))
        errors = tier.put_many([PutRequest(block_key(i), b"x", payload_checksum(b"x")) for i in range(3)])
        assert all(isinstance(e, TierUnavailableError) for e in errors)
        s3_proxy.set_mode("pass")
        put(tier, block_key(1), b"x")  # recovers once the endpoint does
        assert tier.get(block_key(1)) == b"x"


def test_server_down_is_unavailable_quickly(s3_settings: S3TierConfig, s3_proxy: FaultProxy) -> None:
    settings = via(s3_settings, s3_proxy, max_attempts=2)
    with S3Tier(settings) as tier:
        put(tier, block_key(1), b"kept")
        s3_proxy.set_mode("down")
        start = time.monotonic()
        with pytest.raises(TierUnavailableError, match="unreachable") as info:
            tier.get(block_key(1))
        assert time.monotonic() - start < 15
        assert s3_proxy.endpoint_url in str(info.value)
        s3_proxy.set_mode("pass")
        assert tier.get(block_key(1)) == b"kept"


def test_open_with_endpoint_down_is_unavailable(s3_settings: S3TierConfig) -> None:
    settings = s3_settings.model_copy(update={"endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 2})
    with pytest.raises(TierUnavailableError, match="unreachable"):
        S3Tier(settings)


def test_blackhole_read_timeout_is_unavailable(s3_settings: S3TierConfig, s3_proxy: FaultProxy) -> None:
    settings = via(s3_settings, s3_proxy, max_attempts=2, read_timeout_s=0.5)
    with S3Tier(settings) as tier:
        put(tier, block_key(1), b"kept")
        s3_proxy.set_mode("blackhole")
        start = time.monotonic()
        with pytest.raises(TierUnavailableError, match="ReadTimeout"):
            tier.get(block_key(1))
        assert time.monotonic() - start < 20
        s3_proxy.set_mode("pass")
        assert tier.get(block_key(1)) == b"kept"


# ---- configuration ----------------------------------------------------------------------------


def test_missing_bucket_is_config_error(s3_settings: S3TierConfig) -> None:
    settings = s3_settings.model_copy(update={"bucket": "kvtier-no-such-bucket"})
    with pytest.raises(ConfigError, match="create it or fix KVTIER_S3_BUCKET"):
        S3Tier(settings)


def test_empty_bucket_name_is_config_error(s3_settings: S3TierConfig) -> None:
    with pytest.raises(ConfigError, match="KVTIER_S3_BUCKET"):
        S3Tier(s3_settings.model_copy(update={"bucket": ""}))
