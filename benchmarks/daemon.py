"""The daemon's cost over the tier chain used directly, in the same run.

A real daemon process (``python -m kvtier serve``, host tier only) is measured through the
client library against a TierChain of the same size opened in this process:

- lookup latency (p50, p99) for 256 and 2,048 hashes: the daemon round trip vs the direct call
  (which, like the daemon, builds its block keys from the hashes on every call);
- reserve+commit and acquire+release round trips (latency);
  each over the fast path (what the connector uses) and, for comparison, over gRPC;
- put and get throughput of whole batches: through the daemon (reserve, copy into the shared
  arena, commit / acquire, copy out, verify the checksum, release) vs the same steps on the
  chain directly. A put commits through the client's commit pipeline (what ``write_blocks`` and
  the connector's saves use): the daemon checksums one 4 MiB chunk while the client copies the
  next, which one process cannot do (the checksum holds the GIL). A second row commits once after
  the whole copy, reported without a target, to show the serial cost. Target: the daemon path keeps at least 0.9 of the direct throughput for
  batches the size of real KV transfers (>= 32 MiB: a 1k-token prefix of a 1B model, 512 KiB
  blocks; 8B-class models have 2 MiB blocks). A smaller batch is reported without a target:
  there the daemon's fixed cost, two round trips of tens of microseconds, dominates.

The two sides use different memory (the daemon's arena and the chain's own), and on a VM 4 KiB-page
memory can differ in copy speed by tens of percent from one region to the next, whoever uses it.
So each throughput case adds a ``memory`` row: the same copy+verify over the daemon's slots and
over the chain's, in this process, with no daemon call. Where its ratio is far from 1 the put/get
ratios measure memory placement, not the daemon; put both arenas on huge pages (``--shm-dir`` at a
tmpfs mounted ``huge=always``, see ``scripts/mount_huge_shm.sh``), where memory is uniform.

    python -m benchmarks.daemon [--quick] [--shm-dir DIR]
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Row, compare, gbps, repeats, run_benchmark
from kvtier.blocks import KVLayout, hash_prompt, keys_for, payload_checksum
from kvtier.chain import TierChain
from kvtier.client import DaemonClient, ReserveStatus
from kvtier.config import ChainConfig, HostTierConfig
from kvtier.testing.daemon import LocalDaemon
from kvtier.tiers.host import HostTier

HOST_CAPACITY = "1GiB"
TARGET_MIN_BATCH_BYTES = 32 << 20  # the throughput target applies to batches the size of real KV transfers


def layout_for(block_nbytes: int) -> KVLayout:
    # 2 layers x 2 heads x 16 tokens x (64+64) x 2 bytes = 16 KiB per layer page; scale heads.
    heads = block_nbytes // (2 * 16 * 128 * 2)
    return KVLayout(model="bench/daemon", dtype="bfloat16", num_layers=2, num_kv_heads=heads, head_size=64, block_size=16)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_rows(name: str, daemon_call, direct_call, iterations: int, extra: dict) -> list[Row]:
    daemon_samples, direct_samples = [], []
    for i in range(iterations):
        pair = [(daemon_call, daemon_samples), (direct_call, direct_samples)]
        for call, samples in (pair if i % 2 == 0 else reversed(pair)):
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1e6)
    rows = []
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        rows.append(Row(f"{name} {label}", f"latency_{label}", percentile(daemon_samples, q), percentile(direct_samples, q),
                        unit="us", better="lower", bound="TierChain called in-process", extra=extra))
    return rows


_FLOOR_CHILD = """
import mmap, sys
from kvtier.blocks import payload_checksum
path, arena_nbytes, window_nbytes, block_nbytes = sys.argv[1], *map(int, sys.argv[2:])
with open(path, "r+b") as f:
    shared = memoryview(mmap.mmap(f.fileno(), arena_nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE))
for line in sys.stdin:
    base = int(line)
    for offset in range(base, base + window_nbytes, block_nbytes):
        payload_checksum(shared[offset:offset + block_nbytes])
    sys.stdout.write("k\\n")
    sys.stdout.flush()
"""


def two_process_floor(window_nbytes: int, block_nbytes: int, repeat: int, shm_dir: str) -> Row:
    """What any two-process design pays here, without kvtier: one process writes a window of
    blocks into a shared mapping and another checksums them (one round trip), against one process
    doing both in its own mapping. Shows how much of the put gap is the machine's."""
    arena_nbytes = 4 * window_nbytes
    files = [tempfile.NamedTemporaryFile(dir=shm_dir, prefix="kvtier-floor-") for _ in range(2)]
    for f in files:
        os.posix_fallocate(f.fileno(), 0, arena_nbytes)
    shared, local = (memoryview(mmap.mmap(f.fileno(), arena_nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)) for f in files)
    checker = subprocess.Popen([sys.executable, "-c", _FLOOR_CHILD, files[0].name, str(arena_nbytes), str(window_nbytes), str(block_nbytes)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    data = os.urandom(block_nbytes)
    windows = iter(range(10**6))

    def two_processes() -> None:
        base = next(windows) % 4 * window_nbytes
        for offset in range(base, base + window_nbytes, block_nbytes):
            shared[offset:offset + block_nbytes] = data
        checker.stdin.write(f"{base}\n")
        checker.stdin.flush()
        assert checker.stdout.readline() == "k\n"

    def one_process() -> None:
        base = next(windows) % 4 * window_nbytes
        for offset in range(base, base + window_nbytes, block_nbytes):
            local[offset:offset + block_nbytes] = data
        for offset in range(base, base + window_nbytes, block_nbytes):
            payload_checksum(local[offset:offset + block_nbytes])

    try:
        two_s, one_s = compare(two_processes, one_process, repeat=repeat)
    finally:
        checker.stdin.close()
        checker.wait(30)
        for f in files:
            f.close()
    return Row(f"floor: write+checksum {window_nbytes >> 20} MiB, two processes (no kvtier)", "put_throughput",
               gbps(window_nbytes, two_s), gbps(window_nbytes, one_s), unit="GB/s",
               bound="the same steps in one process", extra={"block_nbytes": block_nbytes})

def run(args) -> list[Row]:
    rows: list[Row] = []
    root = Path(tempfile.mkdtemp(prefix="kvb-", dir="/tmp"))
    daemon = LocalDaemon(root, host_capacity=HOST_CAPACITY, args=["--no-disk", "--no-metrics"],
                         env={"KVTIER_HOST_SHM_DIR": args.shm_dir, "KVTIER_HOST_SLAB_SIZE": "64MiB"})
    daemon.start()
    socket_path = daemon.socket_path
    host = HostTier(HostTierConfig(capacity=HOST_CAPACITY, slab_size="64MiB", shm_dir=args.shm_dir))
    chain = TierChain([host], ChainConfig())
    client = DaemonClient(socket_path, timeout_s=30)
    grpc_client = DaemonClient(socket_path, timeout_s=30, fast_path=False, client_id="bench-grpc")
    try:
        iterations = 200 if args.quick else 1000
        # ---- control-plane latency -------------------------------------------------------------
        small = layout_for(64 * 1024)
        reg = client.register_layout(small)
        grpc_client.register_layout(small)
        assert client.fast_path_active and not grpc_client.fast_path_active
        client.arena(populate=True)  # steady state: every page mapped, as in the in-process chain
        huge = client.arena().huge_page_bytes() >= client.arena().nbytes // 2 and host.arena.huge_page_bytes() >= host.arena.nbytes // 2
        pages = {"arena_pages": "2MiB" if huge else "4KiB"}
        hashes = hash_prompt(list(range(16 * 2048)), 16)
        keys = keys_for(small.layout_id, hashes)
        payload = os.urandom(small.block_nbytes)
        for start in range(0, 2048, 256):
            client.write_blocks(reg.layout_id, {h: payload for h in hashes[start:start + 256]})
        for key in keys:
            chain.put(key, payload)
        spare = hash_prompt(list(range(10**6, 10**6 + 16 * 2 * iterations)), 16)
        spare_keys = keys_for(small.layout_id, spare)
        counter_direct = iter(range(len(spare)))

        def reserve_commit_direct() -> None:
            chain.commit(chain.reserve(spare_keys[next(counter_direct)], small.block_nbytes), checksum=0)

        counter = iter(range(len(spare)))
        for transport, daemon_client in (("fast path", client), ("gRPC", grpc_client)):
            extra = {"transport": transport}
            label = "" if transport == "fast path" else " (gRPC)"
            scale = 1 if transport == "fast path" else 4  # gRPC calls are slow; fewer of them
            for count in (256, 2048):
                rows += latency_rows(f"lookup {count} hashes{label}", lambda: daemon_client.lookup(reg.layout_id, hashes[:count]),
                                     lambda: chain.lookup(keys_for(small.layout_id, hashes[:count])), iterations // (4 if count > 256 else 1) // scale,
                                     {"blocks": count, **extra})

            def reserve_commit_daemon() -> None:
                reservation = daemon_client.reserve(reg.layout_id, [spare[next(counter)]])[0]
                daemon_client.commit([reservation.reservation_id])

            rows += latency_rows(f"reserve+commit 1 block{label}", reserve_commit_daemon, reserve_commit_direct,
                                 iterations // 2 // scale, {"blocks": 1, **extra})
            rows += latency_rows(
                f"acquire+release 32 blocks{label}",
                lambda: daemon_client.release(daemon_client.acquire(reg.layout_id, hashes[:32]).lease_id),
                lambda: chain.release(chain.acquire(keys_for(small.layout_id, hashes[:32])).lease_id),
                iterations // scale, {"blocks": 32, **extra},
            )

        # ---- data-plane throughput -------------------------------------------------------------
        repeat = repeats(args, quick=5, full=9)
        cases = [(256 * 1024, 32), (512 * 1024, 64), (2 << 20, 32), (2 << 20, 128)]
        if not args.quick:
            cases = [(64 * 1024, 256), (256 * 1024, 128)] + cases
        for block_nbytes, batch in cases:
            layout = layout_for(block_nbytes)
            reg = client.register_layout(layout)
            data = os.urandom(block_nbytes)
            checksum = payload_checksum(data)
            arena = client.arena()
            rounds = iter(range(10**6))
            rounds_direct = iter(range(10**6))

            def batch_hashes(n: int) -> list[bytes]:
                return hash_prompt([block_nbytes, batch, n] + list(range(16 * batch - 3)), 16)

            def reserve_batch() -> list:
                reservations = client.reserve(reg.layout_id, batch_hashes(next(rounds)), block_nbytes)
                if any(r.status is not ReserveStatus.RESERVED for r in reservations):
                    raise RuntimeError(f"daemon reserved only {sum(r.status is ReserveStatus.RESERVED for r in reservations)} of {batch}: {client.stats()}")
                return reservations

            def put_daemon() -> None:  # the client's write path (write_blocks, the connector's saves)
                reservations = reserve_batch()
                with client.commit_pipeline(reservations) as pipeline:
                    for r in reservations:
                        arena.view(r.offset, r.nbytes)[:] = data
                        pipeline.filled((r,))

            def put_daemon_one_commit() -> None:
                reservations = reserve_batch()
                for r in reservations:
                    arena.view(r.offset, r.nbytes)[:] = data
                client.commit([r.reservation_id for r in reservations])

            def put_direct() -> None:
                ks = keys_for(layout.layout_id, batch_hashes(next(rounds_direct)))
                slots = [chain.reserve(k, block_nbytes) for k in ks]
                for slot in slots:
                    chain.host.slot_view(slot)[:] = data
                for slot in slots:
                    chain.commit(slot)

            total = batch * block_nbytes
            target = 0.9 if total >= TARGET_MIN_BATCH_BYTES else None
            put_s, put_bound_s = compare(put_daemon, put_direct, repeat=repeat)
            rows.append(Row(f"put {batch}x{block_nbytes >> 10}KiB", "put_throughput", gbps(total, put_s), gbps(total, put_bound_s),
                            unit="GB/s", target=target, bound="TierChain reserve/copy/commit in-process",
                            extra={"block_nbytes": block_nbytes, "batch": batch, "commit": "pipelined", **pages}))
            put_s, put_bound_s = compare(put_daemon_one_commit, put_direct, repeat=repeat)
            rows.append(Row(f"put {batch}x{block_nbytes >> 10}KiB, one commit", "put_throughput", gbps(total, put_s), gbps(total, put_bound_s),
                            unit="GB/s", bound="TierChain reserve/copy/commit in-process",
                            extra={"block_nbytes": block_nbytes, "batch": batch, "commit": "one, after the copy", **pages}))

            read_hashes = batch_hashes(10**7)
            client.write_blocks(reg.layout_id, {h: data for h in read_hashes})
            read_keys = keys_for(layout.layout_id, read_hashes)
            for key in read_keys:
                chain.put(key, data, checksum)
            out = bytearray(block_nbytes)

            def get_daemon() -> None:
                grant = client.acquire(reg.layout_id, read_hashes)
                for block in grant.blocks:
                    out[:] = arena.view(block.offset, block.nbytes)
                    assert payload_checksum(out) == block.checksum
                client.release(grant.lease_id)

            def get_direct() -> None:
                lease = chain.acquire(keys_for(layout.layout_id, read_hashes))
                for slot, expected in lease.locations:
                    out[:] = chain.host.slot_view(slot)
                    assert payload_checksum(out) == expected
                chain.release(lease.lease_id)

            get_s, get_bound_s = compare(get_daemon, get_direct, repeat=repeat)
            rows.append(Row(f"get {batch}x{block_nbytes >> 10}KiB", "get_throughput", gbps(total, get_s), gbps(total, get_bound_s),
                            unit="GB/s", target=target, bound="TierChain acquire/copy/verify in-process", extra={"block_nbytes": block_nbytes, "batch": batch, **pages}))

            grant = client.acquire(reg.layout_id, read_hashes)
            lease = chain.acquire(read_keys)
            daemon_views = [(arena.view(block.offset, block.nbytes), block.checksum) for block in grant.blocks]
            chain_views = [(chain.host.slot_view(slot), expected) for slot, expected in lease.locations]

            def copy_verify(views) -> None:
                for view, expected in views:
                    out[:] = view
                    assert payload_checksum(out) == expected

            try:
                daemon_memory_s, chain_memory_s = compare(lambda: copy_verify(daemon_views), lambda: copy_verify(chain_views), repeat=repeat)
            finally:
                del daemon_views, chain_views
                client.release(grant.lease_id)
                chain.release(lease.lease_id)
            rows.append(Row(f"memory {batch}x{block_nbytes >> 10}KiB", "memory_throughput", gbps(total, daemon_memory_s), gbps(total, chain_memory_s),
                            unit="GB/s", bound="copy+verify over the chain's slots, no daemon call", extra={"block_nbytes": block_nbytes, "batch": batch, **pages}))
        rows.append(two_process_floor(256 << 20, 2 << 20, repeat, args.shm_dir))
    finally:
        client.close()
        grpc_client.close()
        chain.close()
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--shm-dir", default="/dev/shm",
                        help="memory filesystem of both arenas (default /dev/shm); a tmpfs mounted huge=always gives uniform memory")


def main() -> int:
    return run_benchmark("daemon", __doc__.splitlines()[0], run, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
