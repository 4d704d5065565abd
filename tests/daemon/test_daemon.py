"""The daemon as clients see it: concurrent writers and readers through the arena, stats,
metrics, socket permissions, stats CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.blocks import KVLayout, hash_prompt
from kvtier.client import ReserveStatus
from kvtier.errors import DaemonUnavailableError, InvalidRequestError
from tests.daemon.conftest import LAYOUT, DaemonProcess, payload

WRITER = textwrap.dedent(
    """
    import os, sys, random
    from kvtier.blocks import KVLayout, hash_prompt
    from kvtier.client import DaemonClient
    socket_path, worker, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    layout = KVLayout(model="test/tiny", dtype="float16", num_layers=2, num_kv_heads=2, head_size=64, block_size=16)
    def payload(h):
        return random.Random(h).randbytes(layout.block_nbytes)
    with DaemonClient(socket_path, client_id=f"writer-{worker}") as client:
        reg = client.register_layout(layout)
        # Shared prefix (all workers) + private suffix: overlapping and distinct blocks.
        tokens = list(range(64)) + [1000 * (worker + 1) + i for i in range(16 * blocks)]
        hashes = hash_prompt(tokens, 16)
        for start in range(0, len(hashes), 8):
            batch = hashes[start:start + 8]
            client.write_blocks(reg.layout_id, {h: payload(h) for h in batch})
        for _ in range(3):
            got = client.read_blocks(reg.layout_id, hashes)
            for h, data in zip(hashes, got):
                assert data == payload(h), "wrong bytes"
        print(len(got))
    """
)


def scrape(daemon: DaemonProcess) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_socket_is_not_world_accessible(daemon: DaemonProcess) -> None:
    mode = stat.S_IMODE(os.stat(daemon.socket_path).st_mode)
    assert mode & 0o007 == 0, oct(mode)


def test_concurrent_clients_write_and_read_verified(daemon: DaemonProcess) -> None:
    workers, blocks = 4, 20
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(daemon.socket_path), str(w), str(blocks)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(workers)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert int(out.strip()) > 0

    with daemon.client() as client:
        stats = client.stats()
        host = stats.chain.tiers[0]
        distinct_blocks = 4 + workers * blocks  # 4 shared prefix blocks + private ones
        assert host.counters.bytes_in == distinct_blocks * LAYOUT.block_nbytes
        assert stats.active_reservations == 0 and stats.chain.active_leases == 0
        # Everything was read back at least once by its writer, from host memory.
        assert host.counters.hits >= distinct_blocks
        metrics = scrape(daemon)
        assert metrics[("kvtier_tier_bytes_in_total", (("kind", "host"), ("tier", "host")))] == host.counters.bytes_in
        assert metrics[("kvtier_tier_hits_total", (("kind", "host"), ("tier", "host")))] == host.counters.hits
        assert metrics[("kvtier_tier_blocks", (("kind", "host"), ("tier", "host")))] == host.blocks
        assert metrics[("kvtier_rpc_latency_seconds_count", (("code", "OK"), ("method", "Reserve")))] >= workers
        assert metrics[("kvtier_active_leases", ())] == 0


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "grpc"])
def test_lookup_reserve_commit_acquire_round_trip(daemon: DaemonProcess, fast_path: bool) -> None:
    hashes = hash_prompt(list(range(16 * 6)), 16)
    with daemon.client(fast_path=fast_path) as client:
        reg = client.register_layout(LAYOUT)
        assert client.fast_path_active is fast_path
        assert reg.layout_id == LAYOUT.layout_id and reg.block_nbytes == LAYOUT.block_nbytes
        assert client.lookup(reg.layout_id, hashes) == []
        statuses = client.write_blocks(reg.layout_id, {h: payload(h) for h in hashes[:4]})
        assert set(statuses.values()) == {ReserveStatus.RESERVED}
        assert client.lookup(reg.layout_id, hashes) == ["host"] * 4
        again = client.reserve(reg.layout_id, hashes[:5])
        assert [r.status for r in again] == [ReserveStatus.ALREADY_PRESENT] * 4 + [ReserveStatus.RESERVED]
        client.abort([again[4].reservation_id])
        grant = client.acquire(reg.layout_id, hashes)
        assert [b.block_hash for b in grant.blocks] == hashes[:4]
        client.release(grant.lease_id)
        assert client.read_blocks(reg.layout_id, hashes) == [payload(h) for h in hashes[:4]]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "grpc"])
def test_write_back_reaches_disk_and_prefetch_promotes(daemon: DaemonProcess, fast_path: bool) -> None:
    hashes = hash_prompt(list(range(16 * 1200)), 16)  # 1200 x 8 KiB > 8 MiB host arena
    with daemon.client(fast_path=fast_path) as client:
        reg = client.register_layout(LAYOUT)
        for start in range(0, len(hashes), 100):
            statuses = client.write_blocks(reg.layout_id, {h: payload(h) for h in hashes[start:start + 100]})
            assert set(statuses.values()) == {ReserveStatus.RESERVED}
            daemon.wait_for_demotions()
        tiers = client.lookup(reg.layout_id, hashes)
        assert len(tiers) == len(hashes) and tiers[0] == "disk" and tiers[-1] == "host"
        host_blocks, done = client.prefetch(reg.layout_id, hashes[:10], wait_s=10)
        assert done and host_blocks == 10
        assert client.read_blocks(reg.layout_id, hashes[:10]) == [payload(h) for h in hashes[:10]]
        disk = client.stats().chain.tiers[1]
        assert disk.counters.promotions >= 10 and disk.counters.hits >= 10


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "grpc"])
def test_fetch_promotes_and_leases_within_a_budget(daemon: DaemonProcess, fast_path: bool) -> None:
    """Fetch: promote, wait as a budget allows, and lease what arrived, in one call."""
    from kvtier.chain.promotion import FetchBudget

    hashes = hash_prompt(list(range(16 * 1100)), 16)  # more than the 8 MiB host arena: the first ones go to disk only
    with daemon.client(fast_path=fast_path) as client:
        reg = client.register_layout(LAYOUT)
        for start in range(0, len(hashes), 100):
            client.write_blocks(reg.layout_id, {h: payload(h) for h in hashes[start:start + 100]})
            daemon.wait_for_demotions()
        assert client.lookup(reg.layout_id, hashes[:40])[:40] == ["disk"] * 40
        # A budget that lets nothing be waited for: the call returns at once, having given up.
        hasty = client.fetch(reg.layout_id, hashes[:40], FetchBudget(block_s=0.0, allowance_s=1e-6), max_wait_s=5)
        assert hasty.gave_up or hasty.done
        if hasty.lease is not None:
            client.release(hasty.lease.lease_id)
        # A generous one: everything arrives and is leased in the same call, verified on read.
        fetched = client.fetch(reg.layout_id, hashes[:40], FetchBudget(block_s=1.0, allowance_s=5.0), max_wait_s=30)
        assert fetched.done and not fetched.gave_up and fetched.host_blocks == 40
        assert [b.block_hash for b in fetched.lease.blocks] == hashes[:40]
        arena = client.arena()
        assert all(bytes(arena.view(b.offset, b.nbytes)) == payload(b.block_hash) for b in fetched.lease.blocks)
        assert client.stats().chain.active_leases == 1
        client.release(fetched.lease.lease_id)


def test_stats_cli(daemon: DaemonProcess) -> None:
    base = [sys.executable, "-m", "kvtier", "stats", "--socket", str(daemon.socket_path)]
    table = subprocess.run(base, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "host" in table and "disk" in table and "hit rate" in table
    data = json.loads(subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=60, check=True).stdout)
    assert [t["name"] for t in data["tiers"]] == ["host", "disk"]
    watched = subprocess.run(base + ["--json", "--watch", "--interval", "0.1", "--count", "3"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert len(watched.strip().splitlines()) == 3


def test_stats_cli_without_daemon(daemon_root) -> None:
    result = subprocess.run([sys.executable, "-m", "kvtier", "stats", "--socket", str(daemon_root / "none.sock"), "--timeout", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "kvtier: error:" in result.stderr and "Traceback" not in result.stderr


def test_what_clients_count_shows_in_kvtier_stats(daemon: DaemonProcess) -> None:
    with daemon.client(client_id="engine-a-worker") as worker, daemon.client(client_id="engine-b-scheduler") as scheduler:
        worker.report_counters("vllm-worker", {"loaded_blocks": 10, "load_corrupt": 2}, {"load_corrupt": 2})
        scheduler.report_counters("vllm-scheduler", {"lookups": 5, "lookup_unavailable": 1}, {"lookup_unavailable": 1})
        worker.report_counters("vllm-worker", {"loaded_blocks": 12, "load_corrupt": 3}, {"load_corrupt": 3})  # replaces the first
        for counters, role in (({"Bad-Name": 1}, "vllm-worker"), ({"x" * 80: 1}, "vllm-worker"), ({}, "")):
            with pytest.raises(InvalidRequestError):
                worker.report_counters(role, counters, {})
        clients = {c.client_id: c for c in worker.stats().clients}
    assert {name: (c.role, c.counters, c.failures) for name, c in clients.items()} == {
        "engine-a-worker": ("vllm-worker", {"loaded_blocks": 12, "load_corrupt": 3}, {"load_corrupt": 3}),
        "engine-b-scheduler": ("vllm-scheduler", {"lookups": 5, "lookup_unavailable": 1}, {"lookup_unavailable": 1}),
    }
    base = [sys.executable, "-m", "kvtier", "stats", "--socket", str(daemon.socket_path)]
    table = subprocess.run(base, capture_output=True, text=True, timeout=60, check=True).stdout
    assert ("clients reporting: 2 (vllm-scheduler 1, vllm-worker 1); failures they counted: load_corrupt 3, "
            "lookup_unavailable 1") in table, table
    data = json.loads(subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=60, check=True).stdout)
    assert data["client_failures"] == {"load_corrupt": 3, "lookup_unavailable": 1}
    assert {c["client_id"] for c in data["clients"]} == set(clients)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "grpc"])
def test_a_refreshing_lookup_keeps_blocks_in_host_memory_without_counting_a_hit(daemon_root, fast_path: bool) -> None:
    layout = KVLayout(model="test/refresh", dtype="float16", num_layers=2, num_kv_heads=8, head_size=128, block_size=16)
    assert layout.block_nbytes == 128 * 1024  # eight fill the 1 MiB of host memory
    daemon = DaemonProcess(daemon_root, extra_args=["--host-capacity", "1MiB"])
    daemon.start()
    try:
        hashes = hash_prompt(list(range(16 * 11)), 16)
        with daemon.client(fast_path=fast_path) as client:
            reg = client.register_layout(layout)

            def store(blocks: list[bytes]) -> None:
                client.write_blocks(reg.layout_id, {h: h * (layout.block_nbytes // len(h)) for h in blocks})
                assert daemon.wait_for_saves(min(len(blocks), 8), timeout=30)  # written back: eviction follows recency alone

            store(hashes[:8])
            hits = client.stats().chain.tiers[0].counters.hits
            assert client.lookup(reg.layout_id, hashes[:2], refresh=True) == ["host", "host"]
            for block in hashes[8:11]:
                store([block])
            assert client.lookup(reg.layout_id, hashes[:2]) == ["host", "host"]  # kept: used just now
            assert client.lookup(reg.layout_id, hashes[2:3]) == ["disk"]  # evicted in their place
            assert client.stats().chain.tiers[0].counters.hits == hits
    finally:
        daemon.stop()


def test_a_call_on_a_client_closed_by_another_thread_is_an_unavailable_daemon(daemon: DaemonProcess) -> None:
    """A reconnect closes the old client while another thread may still hold it: its next call is
    DaemonUnavailableError (which the connector's link handles), not grpc's ValueError."""
    client = daemon.client()
    client.register_layout(LAYOUT)
    client.close()
    with pytest.raises(DaemonUnavailableError, match="closed"):
        client.stats()
    with pytest.raises(DaemonUnavailableError):
        client.lookup(LAYOUT.layout_id, [])
