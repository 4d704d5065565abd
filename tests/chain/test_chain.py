"""The tier chain over a real host arena and a real disk tier (and S3 where marked)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.blocks.keys import BlockKey
from kvtier.chain import TierChain
from kvtier.config import ChainConfig, DiskTierConfig, HostTierConfig, WriteMode
from kvtier.errors import LeaseError
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.host import HostTier

BLOCK = 64 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(n: int) -> BlockKey:
    return BlockKey("00000000000000cc", n.to_bytes(16, "big"))


def data(n: int, size: int = BLOCK) -> bytes:
    return (n.to_bytes(8, "little") * (size // 8 + 1))[:size]


def make_chain(
    tmp_path: Path,
    *,
    host_blocks: int = 8,
    disk_blocks: int | None = 64,
    write_mode: WriteMode = WriteMode.WRITE_BACK,
    eviction: str = "lru",
    clock: FakeClock | None = None,
) -> TierChain:
    tiers = [HostTier(HostTierConfig(capacity=host_blocks * BLOCK, slab_size=BLOCK))]
    if disk_blocks is not None:
        disk = DiskTier(DiskTierConfig(path=tmp_path / "disk", capacity=disk_blocks * (BLOCK + 4096)))
        tiers.append(disk)
    config = ChainConfig(write_mode=write_mode, eviction=eviction, lease_ttl_s=10)
    return TierChain(tiers, config, clock=clock or FakeClock())


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[TierChain]:
    chain = make_chain(tmp_path)
    yield chain
    chain.close()


def tier_stats(chain: TierChain, name: str):
    return next(t for t in chain.stats().tiers if t.name == name)


def disk_file(tmp_path: Path, k: BlockKey) -> Path:
    return next((tmp_path / "disk").rglob(f"{k.hash_hex}.kvb"))


def test_write_back_demotes_in_background(chain: TierChain) -> None:
    for n in range(4):
        assert chain.put(key(n), data(n))
    assert chain.flush(10)
    disk = tier_stats(chain, "disk")
    assert disk.blocks == 4 and disk.counters.demotions == 4
    assert chain.tiers[1].get(key(2)) == data(2)


def test_write_through_is_on_disk_when_put_returns(tmp_path: Path) -> None:
    chain = make_chain(tmp_path, write_mode=WriteMode.WRITE_THROUGH)
    try:
        chain.put(key(1), data(1))
        assert chain.tiers[1].get(key(1)) == data(1)  # no flush needed
        assert chain.stats().pending_demotions == 0
    finally:
        chain.close()


def test_eviction_then_promotion_from_disk(chain: TierChain) -> None:
    for n in range(20):  # host holds 8
        chain.put(key(n), data(n))
        chain.flush(10)
    host = tier_stats(chain, "host")
    assert host.blocks == 8 and host.counters.evictions == 12 and host.counters.dropped == 0
    assert chain.lookup([key(0), key(1)]) == ["disk", "disk"]
    assert chain.get(key(0)) == data(0)  # from disk, verified, promoted
    assert chain.lookup([key(0)]) == ["host"]
    disk = tier_stats(chain, "disk")
    assert disk.counters.promotions == 1 and disk.counters.hits == 1


def test_lookup_stops_at_first_miss(chain: TierChain) -> None:
    chain.put(key(1), data(1))
    chain.put(key(3), data(3))
    assert chain.lookup([key(1), key(2), key(3)]) == ["host"]
    assert chain.lookup([key(2), key(3)]) == []


def test_a_refreshing_lookup_keeps_a_prefix_in_host_memory_without_counting_a_hit(chain: TierChain) -> None:
    for n in range(8):  # host memory full, key(0) the least recently used
        chain.put(key(n), data(n))
    # Every block written back first: eviction prefers clean blocks, so a block whose write-back
    # happened to finish last would otherwise be kept whatever its recency.
    chain.flush(10)
    hits = tier_stats(chain, "host").counters.hits
    assert chain.lookup([key(0), key(1)], refresh=True) == ["host", "host"]
    assert chain.lookup([key(2)]) == ["host"]  # a plain lookup changes nothing
    for n in range(8, 11):
        chain.put(key(n), data(n))
        chain.flush(10)
    assert chain.lookup([key(0), key(1)]) == ["host", "host"]  # kept: used just now
    assert chain.lookup([key(2)]) == ["disk"]  # evicted in their place
    assert tier_stats(chain, "host").counters.hits == hits


def test_capacities_hold(tmp_path: Path) -> None:
    chain = make_chain(tmp_path, host_blocks=4, disk_blocks=10)
    try:
        for n in range(60):
            chain.put(key(n), data(n))
            if n % 7 == 0:
                chain.flush(10)
            for tier in chain.stats().tiers:
                assert tier.used_bytes <= tier.capacity_bytes
        chain.flush(10)
        disk = tier_stats(chain, "disk")
        assert disk.blocks <= 10 and disk.counters.evictions > 0
        on_disk = sum(f.stat().st_size for f in (tmp_path / "disk").rglob("*.kvb"))
        assert on_disk <= chain.tiers[1].capacity_bytes
    finally:
        chain.close()


def test_pinned_blocks_are_never_evicted(chain: TierChain) -> None:
    for n in range(8):
        chain.put(key(n), data(n))
    chain.flush(10)
    lease = chain.acquire([key(0), key(1)])
    assert lease.keys == (key(0), key(1))
    for n in range(8, 40):
        chain.put(key(n), data(n))
        chain.flush(10)
    assert chain.lookup([key(0), key(1)]) == ["host", "host"]
    assert bytes(chain.host.view(key(0))) == data(0)
    chain.release(lease.lease_id)
    with pytest.raises(LeaseError):
        chain.release(lease.lease_id)


def test_expired_leases_unpin(tmp_path: Path) -> None:
    clock = FakeClock()
    chain = make_chain(tmp_path, host_blocks=2, disk_blocks=None, clock=clock)
    try:
        chain.put(key(0), data(0))
        chain.put(key(1), data(1))
        chain.acquire([key(0), key(1)])  # never released: a crashed client
        assert not chain.put(key(2), data(2))  # everything pinned: refused, nothing lost
        assert chain.get(key(0)) == data(0)
        clock.now += 11
        assert chain.put(key(2), data(2))
        assert chain.stats().active_leases == 0
    finally:
        chain.close()


def test_acquire_pins_only_the_leading_host_run(chain: TierChain) -> None:
    chain.put(key(1), data(1))
    chain.put(key(3), data(3))
    lease = chain.acquire([key(1), key(2), key(3)])
    assert lease.keys == (key(1),)
    chain.release(lease.lease_id)


def test_corrupt_disk_block_is_a_miss_and_deleted(tmp_path: Path) -> None:
    chain = make_chain(tmp_path, host_blocks=2)
    try:
        for n in range(6):
            chain.put(key(n), data(n))
            chain.flush(10)
        path = disk_file(tmp_path, key(0))
        raw = bytearray(path.read_bytes())
        raw[4096 + 100] ^= 0xFF
        path.write_bytes(bytes(raw))
        assert chain.get(key(0)) is None
        disk = tier_stats(chain, "disk")
        assert disk.counters.corrupt == 1
        assert not path.exists()
        assert chain.lookup([key(0)]) == []
        assert chain.get(key(1)) == data(1)  # neighbours unaffected
    finally:
        chain.close()


def test_restart_serves_disk_blocks(tmp_path: Path) -> None:
    chain = make_chain(tmp_path)
    for n in range(5):
        chain.put(key(n), data(n))
    chain.close()  # flushes write-back
    chain = make_chain(tmp_path)
    try:
        assert chain.lookup([key(n) for n in range(6)]) == ["disk"] * 5
        assert all(chain.get(key(n)) == data(n) for n in range(5))
        assert tier_stats(chain, "disk").blocks == 5
    finally:
        chain.close()


def test_prefetch_promotes_a_prefix(chain: TierChain) -> None:
    for n in range(16):
        chain.put(key(n), data(n))
        chain.flush(10)
    assert chain.lookup([key(0), key(1), key(2)]) == ["disk"] * 3
    assert chain.prefetch([key(0), key(1), key(2), key(999)]).result(10) == 3
    assert chain.lookup([key(0), key(1), key(2)]) == ["host"] * 3


def test_reserve_commit_zero_copy(chain: TierChain) -> None:
    slot = chain.reserve(key(7), 5000)
    chain.host.slot_view(slot)[:] = b"z" * 5000
    assert chain.lookup([key(7)]) == []
    chain.commit(slot)
    assert chain.get(key(7)) == b"z" * 5000
    chain.flush(10)
    assert chain.tiers[1].get(key(7)) == b"z" * 5000


def test_scan_resistance_of_s3fifo(tmp_path: Path) -> None:
    """A hot set that is reused survives a one-time scan under S3-FIFO but not under LRU."""
    survivors = {}
    for policy in ("lru", "s3fifo"):
        chain = make_chain(tmp_path / policy, host_blocks=20, disk_blocks=None, eviction=policy)
        try:
            hot = [key(n) for n in range(10)]
            for k in hot:
                chain.put(k, data(0))
            for _ in range(3):
                for k in hot:
                    chain.get(k)
            for n in range(100, 130):  # scan of 30 one-time blocks
                chain.put(key(n), data(n))
            survivors[policy] = sum(1 for k in hot if chain.lookup([k]) == ["host"])
        finally:
            chain.close()
    assert survivors["s3fifo"] == 10
    assert survivors["lru"] < 10


@pytest.mark.parametrize("eviction", ["lru", "s3fifo"])
def test_a_larger_block_size_gets_room_in_an_arena_full_of_small_blocks(eviction: str) -> None:
    """Slabs are carved per slot size: once small blocks hold every slab, a larger block needs a
    whole slab emptied, which evicting one policy victim at a time (spread over all slabs)
    rarely achieves. The chain empties the emptiest slab instead; pinned blocks stay."""
    small, large = 4 * 1024, 256 * 1024
    host = HostTier(HostTierConfig(capacity=16 * large, slab_size=large))  # 16 slabs of 64 small slots each
    chain = TierChain([host], ChainConfig(eviction=eviction, lease_ttl_s=10), clock=FakeClock())
    try:
        for n in range(16 * 64):
            chain.put(key(n), data(n, small))
        assert tier_stats(chain, "host").blocks == 16 * 64
        lease = chain.acquire([key(n) for n in range(0, 16 * 64, 64)])  # one pinned block in every slab but none
        assert len(lease.keys) == 16
        chain.release(lease.lease_id)
        lease = chain.acquire([key(n) for n in range(64, 16 * 64, 64)])  # every slab but the first pinned
        for n in range(3):
            chain.put(key(10_000 + n), data(n, large))
            assert chain.get(key(10_000 + n)) == data(n, large)
        assert all(chain.get(k) is not None for k in lease.keys), "pinned blocks are never evicted"
        chain.release(lease.lease_id)
    finally:
        chain.close()
