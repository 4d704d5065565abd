"""Peer fetch between two daemon processes: the bytes arrive, are checked, and load as host hits."""

from __future__ import annotations

import uuid

import httpx
import pytest

from kvtier.testing.daemon import wait_until
from tests.transport.conftest import LAYOUT, prompt_hashes

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("transport", ["nixl", "tcp"])
def test_b_pulls_what_a_holds_and_reads_the_same_bytes(peer_pair, transport: str) -> None:
    if transport == "nixl":
        pytest.importorskip("nixl")
    pair = peer_pair(transport, transport)
    hashes = prompt_hashes(24)
    data = pair.fill_a(hashes)
    assert pair.wait_b_sees_peer(hashes), pair.b.log()[-3000:]
    host_blocks, done = pair.client_b.prefetch(LAYOUT.layout_id, hashes, wait_s=10)
    assert (host_blocks, done) == (24, True), pair.b.log()[-3000:]
    assert pair.client_b.lookup(LAYOUT.layout_id, hashes) == ["host"] * 24
    assert pair.client_b.read_blocks(LAYOUT.layout_id, hashes) == [data[h] for h in hashes]
    stats = pair.peer_stats(pair.client_b)
    assert stats["hits"] == 24 and stats["corrupt"] == 0 and stats["errors"] == 0
    assert stats["bytes_in"] == 24 * LAYOUT.block_nbytes
    # The data path really used, and the holder's side, as Prometheus shows them.
    puller = httpx.get(f"http://127.0.0.1:{pair.b.metrics_port}/metrics").text
    holder = httpx.get(f"http://127.0.0.1:{pair.a.metrics_port}/metrics").text
    assert f'kvtier_peer_fetches_total{{transport="{transport}"}} 1.0' in puller
    assert 'kvtier_tier_hits_total{kind="peer",tier="peer"} 24.0' in puller
    assert "kvtier_peer_offered_blocks_total 24.0" in holder
    assert f"kvtier_peer_served_blocks_total {24.0 if transport == 'tcp' else 0.0}" in holder


@pytest.mark.s3
def test_b_reads_blocks_a_wrote_to_the_shared_bucket_after_b_started(peer_pair, moto_endpoint: str) -> None:
    """Only S3 is shared (peers disabled): B learns from the index that its own bucket now holds
    A's blocks, adopts them into its S3 catalogue and promotes them like any S3 hit."""
    import boto3

    bucket = f"shared-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    s3 = {"KVTIER_S3_ENABLED": "true", "KVTIER_S3_BUCKET": bucket, "KVTIER_S3_ENDPOINT_URL": moto_endpoint,
          "KVTIER_DISK_ENABLED": "false", "KVTIER_CHAIN_WRITE_MODE": "write-through", "KVTIER_PEER_ENABLED": "false"}
    pair = peer_pair(env_a=s3, env_b=s3)
    hashes = prompt_hashes(8, seed=3)
    assert pair.client_b.lookup(LAYOUT.layout_id, hashes) == []  # B started before A wrote anything
    data = pair.fill_a(hashes)
    assert wait_until(lambda: pair.client_b.lookup(LAYOUT.layout_id, hashes) == ["s3"] * 8, timeout=20), pair.b.log()[-3000:]
    assert pair.client_b.prefetch(LAYOUT.layout_id, hashes, wait_s=10) == (8, True)
    assert pair.client_b.read_blocks(LAYOUT.layout_id, hashes) == [data[h] for h in hashes]
    s3_tier = next(t for t in pair.client_b.stats().chain.tiers if t.name == "s3")
    assert s3_tier.counters.hits == 8 and s3_tier.counters.corrupt == 0
