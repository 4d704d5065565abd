"""Property-based tests: random put/get/pin/release/evict/corrupt/restart sequences against a
plain dict model. No read ever returns bytes other than those put; capacities always hold;
leased blocks stay readable from host memory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.blocks.keys import BlockKey
from kvtier.chain import TierChain
from kvtier.config import ChainConfig, DiskTierConfig, HostTierConfig, WriteMode
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.host import HostTier

SLAB = 64 * 1024
KEYS = [BlockKey("00000000000000dd", n.to_bytes(16, "big")) for n in range(24)]
SIZES = [100, 4096, 5000, 30000, 65536]


def payload_for(index: int, size: int) -> bytes:
    # Same key -> same bytes (as with real block hashes), so re-puts never disagree.
    return (bytes([index + 1]) * 7 + index.to_bytes(2, "big") + size.to_bytes(4, "big"))[:size].ljust(size, b"\x5a")


class ChainMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kvtier-prop-"))
        self.model: dict[BlockKey, bytes] = {}
        self.sizes: dict[int, int] = {}
        self.leases: list[tuple[int, tuple[BlockKey, ...]]] = []
        self.write_mode = WriteMode.WRITE_BACK
        self.eviction = "lru"
        self.chain = self._open()

    def _open(self) -> TierChain:
        host = HostTier(HostTierConfig(capacity=4 * SLAB, slab_size=SLAB))
        disk = DiskTier(DiskTierConfig(path=self.dir / "disk", capacity=10 * (SLAB + 4096)))
        return TierChain([host, disk], ChainConfig(write_mode=self.write_mode, eviction=self.eviction, demotion_threads=2))

    @rule(index=st.integers(0, len(KEYS) - 1), size=st.sampled_from(SIZES))
    def put(self, index: int, size: int) -> None:
        size = self.sizes.setdefault(index, size)
        data = payload_for(index, size)
        if self.chain.put(KEYS[index], data):
            self.model[KEYS[index]] = data

    @rule(index=st.integers(0, len(KEYS) - 1))
    def get(self, index: int) -> None:
        got = self.chain.get(KEYS[index])
        assert got is None or got == self.model.get(KEYS[index]), f"wrong bytes for key {index}"

    @rule(start=st.integers(0, len(KEYS) - 1), count=st.integers(1, 4))
    def acquire(self, start: int, count: int) -> None:
        lease = self.chain.acquire(KEYS[start : start + count])
        self.leases.append((lease.lease_id, lease.keys))

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease_id, _ = self.leases.pop(data.draw(st.integers(0, len(self.leases) - 1)))
        self.chain.release(lease_id)

    @rule()
    def flush(self) -> None:
        assert self.chain.flush(30)

    @rule(index=st.integers(0, len(KEYS) - 1), offset=st.integers(0, 70000))
    def corrupt_on_disk(self, index: int, offset: int) -> None:
        for path in (self.dir / "disk").rglob(f"{KEYS[index].hash_hex}.kvb"):
            raw = bytearray(path.read_bytes())
            raw[offset % len(raw)] ^= 0x41
            path.write_bytes(bytes(raw))

    @rule(write_through=st.booleans(), s3fifo=st.booleans())
    def restart(self, write_through: bool, s3fifo: bool) -> None:
        self.chain.close()
        self.leases.clear()
        self.write_mode = WriteMode.WRITE_THROUGH if write_through else WriteMode.WRITE_BACK
        self.eviction = "s3fifo" if s3fifo else "lru"
        self.chain = self._open()

    @invariant()
    def capacities_hold(self) -> None:
        for tier in self.chain.stats().tiers:
            assert tier.used_bytes <= tier.capacity_bytes, tier

    @invariant()
    def leased_blocks_readable_in_place(self) -> None:
        for _, keys in self.leases:
            for key in keys:
                view = self.chain.host.view(key)
                assert view is not None and bytes(view) == self.model[key]

    def teardown(self) -> None:
        self.chain.close()
        shutil.rmtree(self.dir, ignore_errors=True)


ChainMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestChainProperties = ChainMachine.TestCase
