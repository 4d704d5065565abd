"""Crashes and restarts: a killed client's slots come back; a killed daemon's disk blocks are
still served (checksums verified); SIGTERM flushes the write-back queue."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from kvtier.blocks import hash_prompt
from kvtier.client import DaemonClient
from kvtier.testing.daemon import wait_until
from tests.daemon.conftest import LAYOUT, DaemonProcess, payload

HOLDER = textwrap.dedent(
    """
    import sys, time
    from kvtier.blocks import KVLayout, hash_prompt
    from kvtier.client import DaemonClient
    layout = KVLayout(model="test/tiny", dtype="float16", num_layers=2, num_kv_heads=2, head_size=64, block_size=16)
    hashes = hash_prompt(list(range(16 * 40)), 16)
    client = DaemonClient(sys.argv[1], client_id="doomed")
    reg = client.register_layout(layout)
    client.write_blocks(reg.layout_id, {h: bytes([i % 251]) * reg.block_nbytes for i, h in enumerate(hashes[:20])})
    client.acquire(reg.layout_id, hashes[:20], ttl_s=3)      # lease never released
    client.reserve(reg.layout_id, hashes[20:40])            # slots never committed
    print("holding", flush=True)
    time.sleep(600)
    """
)


def test_killed_client_loses_its_leases_and_reservations(daemon: DaemonProcess) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(daemon.socket_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    with daemon.client() as client:
        before = client.stats()
        assert before.active_reservations == 20 and before.chain.active_leases == 1 and before.chain.pinned_blocks >= 20
        used_with_reservations = before.chain.tiers[0].used_bytes
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert wait_until(lambda: client.stats().active_reservations == 0 and client.stats().chain.active_leases == 0)
        assert daemon.wait_for_demotions()  # the daemon's own pins (blocks being written to disk) end too
        after = client.stats()
        assert after.chain.pinned_blocks == 0
        assert after.chain.tiers[0].used_bytes == used_with_reservations - 20 * LAYOUT.block_nbytes
        # The reclaimed slots are usable again and the committed blocks are still intact.
        reg = client.register_layout(LAYOUT)
        hashes = hash_prompt(list(range(16 * 40)), 16)
        assert client.read_blocks(reg.layout_id, hashes[:20]) == [bytes([i % 251]) * reg.block_nbytes for i in range(20)]


def test_daemon_killed_and_restarted_serves_disk_blocks(daemon: DaemonProcess) -> None:
    hashes = hash_prompt(list(range(16 * 50)), 16)
    with daemon.client() as client:
        reg = client.register_layout(LAYOUT)
        client.write_blocks(reg.layout_id, {h: payload(h) for h in hashes})
        assert daemon.wait_for_demotions()
    (old_arena,) = daemon.root.glob("kvtier-*-arena")
    daemon.stop(signal.SIGKILL)
    assert daemon.socket_path.exists() and old_arena.exists()  # left behind by the crash
    daemon.start()  # replaces the stale socket and removes the stale arena
    assert list(daemon.root.glob("kvtier-*-arena")) == [old_arena]  # one arena: the old one's memory was given back
    assert f"removed {old_arena}" in daemon.log()
    with daemon.client() as client:
        reg = client.register_layout(LAYOUT)
        assert client.lookup(reg.layout_id, hashes) == ["disk"] * len(hashes)
        assert client.prefetch(reg.layout_id, hashes, wait_s=20) == (len(hashes), True)
        assert client.read_blocks(reg.layout_id, hashes) == [payload(h) for h in hashes]
        disk = client.stats().chain.tiers[1]
        assert disk.counters.hits == len(hashes) and disk.counters.corrupt == 0


def test_corrupt_disk_block_after_restart_is_a_miss(daemon: DaemonProcess) -> None:
    hashes = hash_prompt(list(range(16 * 6)), 16)
    with daemon.client() as client:
        reg = client.register_layout(LAYOUT)
        client.write_blocks(reg.layout_id, {h: payload(h) for h in hashes})
        assert daemon.wait_for_demotions()
    daemon.stop()
    victim = next(daemon.disk_path.rglob(f"{hashes[2].hex()}.kvb"))
    raw = bytearray(victim.read_bytes())
    raw[4096 + 7] ^= 0x01
    victim.write_bytes(bytes(raw))
    daemon.start()
    with daemon.client() as client:
        reg = client.register_layout(LAYOUT)
        assert client.prefetch(reg.layout_id, hashes, wait_s=20)[0] == 2  # stops at the corrupt block
        assert client.read_blocks(reg.layout_id, hashes) == [payload(h) for h in hashes[:2]]
        assert client.lookup(reg.layout_id, hashes) == ["host", "host"]
        assert client.stats().chain.tiers[1].counters.corrupt == 1
    assert not victim.exists()


def test_sigterm_flushes_write_back(daemon_root) -> None:
    # A slow flush on purpose: tiny host arena is not the point; many blocks queued at SIGTERM is.
    daemon = DaemonProcess(daemon_root, extra_env={"KVTIER_CHAIN_DEMOTION_THREADS": "1", "KVTIER_DISK_FSYNC": "true"})
    daemon.start()
    hashes = hash_prompt(list(range(16 * 400)), 16)
    with daemon.client() as client:
        reg = client.register_layout(LAYOUT)
        client.write_blocks(reg.layout_id, {h: payload(h) for h in hashes})
        pending = client.stats().chain.pending_demotions
    assert pending > 0, "the test needs demotions still queued when SIGTERM arrives"
    assert daemon.stop(signal.SIGTERM) == 0
    assert "kvtier daemon stopped" in daemon.log()
    assert not daemon.socket_path.exists()
    on_disk = {p.stem for p in daemon.disk_path.rglob("*.kvb")}
    assert on_disk == {h.hex() for h in hashes}, f"{pending} were pending at SIGTERM"


def test_client_reconnects_after_daemon_restart(daemon: DaemonProcess) -> None:
    with DaemonClient(daemon.socket_path, timeout_s=2) as client:
        assert client.health()
        daemon.stop()
        assert not client.health()
        daemon.start()
        assert wait_until(client.health, timeout=10)
        assert client.register_layout(LAYOUT).layout_id == LAYOUT.layout_id
