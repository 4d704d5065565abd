"""Peer fetch between two daemon processes: the bytes arrive, are checked, and load as host hits."""

from __future__ import annotations

import pytest

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
