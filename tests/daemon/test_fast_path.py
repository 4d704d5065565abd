"""The daemon's fast path (msgpack frames on ``<socket>.fast``): raw frames a broken or hostile
client might send, sessions that end with their connections, limits, timeouts and restarts."""

from __future__ import annotations

import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from kvtier.blocks import hash_prompt
from kvtier.client import DaemonClient, ReserveStatus
from kvtier.client.fast_channel import FastChannel
from kvtier.daemon.fast_wire import PROTOCOL_VERSION
from kvtier.errors import DaemonUnavailableError, LayoutError
from kvtier.testing.daemon import wait_until
from tests.daemon.conftest import LAYOUT, DaemonProcess

HASHES = hash_prompt(list(range(16 * 8)), 16)


class RawConnection:
    """A fast-path connection driven frame by frame, with no client library in between."""

    def __init__(self, path: Path | tuple[str, int]) -> None:
        """A Unix socket path, or a (host, port) on TCP (the index's fast path)."""
        if isinstance(path, tuple):
            self.sock = socket.create_connection(path, timeout=10)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(str(path))

    def send_bytes(self, body: bytes) -> None:
        self.sock.sendall(struct.pack("<I", len(body)) + body)

    def reply(self) -> dict | None:
        header = self._read(4)
        if header is None:
            return None
        (nbytes,) = struct.unpack("<I", header)
        return msgpack.unpackb(self._read(nbytes), raw=False)

    def call(self, message: object) -> dict | None:
        self.send_bytes(msgpack.packb(message, use_bin_type=True))
        return self.reply()

    def hello(self, client_id: str = "raw-client", **extra: object) -> dict | None:
        return self.call({"op": "Hello", "protocol": PROTOCOL_VERSION, "client_id": client_id, **extra})

    def _read(self, nbytes: int) -> bytes | None:
        data = b""
        while len(data) < nbytes:
            chunk = self.sock.recv(nbytes - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def fast_socket(daemon: DaemonProcess) -> Path:
    return daemon.socket_path.with_name(daemon.socket_path.name + ".fast")


@pytest.fixture
def registered(daemon: DaemonProcess) -> Iterator[DaemonClient]:
    with daemon.client() as client:
        client.register_layout(LAYOUT)
        assert client.fast_path_active
        yield client
        assert client.lookup(LAYOUT.layout_id, HASHES[:1]) in ([], ["host"]), "the daemon must still serve the fast path"
        assert client.health()


@pytest.fixture
def raw(daemon: DaemonProcess, registered: DaemonClient) -> Iterator[RawConnection]:
    connection = RawConnection(fast_socket(daemon))
    yield connection
    connection.close()


def error_of(reply: dict | None) -> str:
    assert reply is not None and "error" in reply, reply
    assert reply["message"], "every error carries a message"
    return reply["error"]


def test_fast_socket_is_not_world_accessible_and_goes_away_on_stop(daemon_root: Path) -> None:
    daemon = DaemonProcess(daemon_root)
    daemon.start()
    path = fast_socket(daemon)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert daemon.stop(signal.SIGTERM) == 0
    assert not path.exists() and not daemon.socket_path.exists()


def test_hello_comes_first_and_names_a_client(raw: RawConnection) -> None:
    assert error_of(raw.call({"op": "Lookup", "layout_id": LAYOUT.layout_id, "block_hashes": []})) == "FAILED_PRECONDITION"
    assert error_of(raw.call({"op": "Hello", "protocol": PROTOCOL_VERSION + 1, "client_id": "x"})) == "FAILED_PRECONDITION"
    assert error_of(raw.call({"op": "Hello", "protocol": PROTOCOL_VERSION, "client_id": ""})) == "INVALID_ARGUMENT"
    assert error_of(raw.call({"op": "Hello", "protocol": PROTOCOL_VERSION})) == "INVALID_ARGUMENT"
    assert error_of(raw.hello(daemon_instance="0" * 32)) == "FAILED_PRECONDITION"  # an arena from another run
    welcome = raw.hello()
    assert welcome["ok"]["protocol"] == PROTOCOL_VERSION and welcome["ok"]["max_message_bytes"] > 0
    assert raw.call({"op": "Lookup", "layout_id": LAYOUT.layout_id, "block_hashes": []}) == {"ok": {"tiers": []}}


def test_malformed_frames_and_fields_get_invalid_argument(raw: RawConnection) -> None:
    raw.hello()
    raw.send_bytes(b"\xc1 not msgpack")
    assert error_of(raw.reply()) == "INVALID_ARGUMENT"
    assert error_of(raw.call([1, 2, 3])) == "INVALID_ARGUMENT"  # an array, not a map
    assert error_of(raw.call({"op": "NoSuchCall"})) == "UNIMPLEMENTED"
    assert error_of(raw.call({"op": 7})) == "UNIMPLEMENTED"
    bad_requests = [
        {"op": "Lookup", "layout_id": LAYOUT.layout_id, "block_hashes": "not a list"},
        {"op": "Lookup", "layout_id": LAYOUT.layout_id, "block_hashes": ["a string, not bytes"]},
        {"op": "Lookup", "layout_id": LAYOUT.layout_id, "block_hashes": [b"short"]},
        {"op": "Lookup", "block_hashes": []},
        {"op": "Reserve", "layout_id": LAYOUT.layout_id, "block_hashes": HASHES[:1], "block_nbytes": "8192"},
        {"op": "Reserve", "layout_id": LAYOUT.layout_id, "block_hashes": HASHES[:1], "block_nbytes": LAYOUT.block_nbytes + 1},
        {"op": "Commit", "reservation_ids": ["1"]},
        {"op": "Commit", "reservation_ids": [123456789]},
        {"op": "Acquire", "layout_id": LAYOUT.layout_id, "block_hashes": HASHES, "ttl_ms": -5},
        {"op": "Release", "lease_id": True},
    ]
    for request in bad_requests:
        assert error_of(raw.call(request)) == "INVALID_ARGUMENT", request
    assert error_of(raw.call({"op": "Release", "lease_id": 987654321})) == "NOT_FOUND"
    assert error_of(raw.call({"op": "Lookup", "layout_id": "00000000deadbeef", "block_hashes": []})) == "FAILED_PRECONDITION"
    # The same connection still works after every one of those.
    reserved = raw.call({"op": "Reserve", "layout_id": LAYOUT.layout_id, "block_hashes": HASHES[:2]})["ok"]["results"]
    assert [r[0] for r in reserved] == [1, 1]
    assert raw.call({"op": "Abort", "reservation_ids": [r[3] for r in reserved]}) == {"ok": {"aborted": 2}}


def test_oversized_and_truncated_frames_close_only_that_connection(daemon: DaemonProcess, raw: RawConnection) -> None:
    raw.hello()
    raw.sock.sendall(struct.pack("<I", 2**31))  # announces 2 GiB; the body is never read
    assert error_of(raw.reply()) == "RESOURCE_EXHAUSTED"
    assert raw.reply() is None, "the daemon closes a connection whose stream it cannot follow"
    truncated = RawConnection(fast_socket(daemon))
    truncated.hello()
    truncated.sock.sendall(struct.pack("<I", 1000) + b"only a few bytes")
    truncated.close()


def test_a_killed_client_loses_its_slots_when_its_connections_close(daemon_root: Path) -> None:
    # TTLs far longer than the test: only the closed connections can explain the release.
    daemon = DaemonProcess(daemon_root, extra_env={"KVTIER_CHAIN_LEASE_TTL_S": "600", "KVTIER_DAEMON_RESERVATION_TTL_S": "600"})
    daemon.start()
    holder_code = textwrap.dedent(
        """
        import sys, time
        from kvtier.blocks import KVLayout, hash_prompt
        from kvtier.client import DaemonClient
        layout = KVLayout(model="test/tiny", dtype="float16", num_layers=2, num_kv_heads=2, head_size=64, block_size=16)
        hashes = hash_prompt(list(range(16 * 8)), 16)
        client = DaemonClient(sys.argv[1], client_id="doomed")
        reg = client.register_layout(layout)
        assert client.fast_path_active
        client.write_blocks(reg.layout_id, {h: b"x" * reg.block_nbytes for h in hashes[:4]})
        client.acquire(reg.layout_id, hashes[:4])
        client.reserve(reg.layout_id, hashes[4:8])
        print("holding", flush=True)
        time.sleep(600)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(daemon.socket_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with daemon.client() as client:
            stats = client.stats()
            assert stats.active_reservations == 4 and stats.chain.active_leases == 1
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            assert wait_until(lambda: client.stats().active_reservations == 0 and client.stats().chain.active_leases == 0, timeout=20)
            assert client.stats().chain.pinned_blocks == 0
        assert "closed its last connection holding 1 leases and 4 reservations" in daemon.log()
    finally:
        holder.kill()
        daemon.stop()


def test_connections_beyond_the_limit_are_refused(daemon_root: Path) -> None:
    daemon = DaemonProcess(daemon_root, extra_env={"KVTIER_DAEMON_MAX_LOCAL_CONNECTIONS": "2"})
    daemon.start()
    try:
        held = [RawConnection(fast_socket(daemon)) for _ in range(2)]
        for connection in held:
            assert "ok" in connection.hello()
        refused = RawConnection(fast_socket(daemon))
        assert error_of(refused.reply()) == "RESOURCE_EXHAUSTED"
        assert refused.reply() is None
        held.pop().close()

        def welcomed() -> bool:  # refused (and closed by the daemon) until it has seen the close
            try:
                return "ok" in (RawConnection(fast_socket(daemon)).hello() or {})
            except OSError:
                return False

        assert wait_until(welcomed, timeout=10)
    finally:
        daemon.stop()


@pytest.mark.timeout(60)  # a hang here would be the bug
def test_a_daemon_that_never_answers_is_a_deadline_error(daemon_root: Path) -> None:
    path = daemon_root / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    channel = FastChannel(str(path), "client", "", timeout_s=0.3)
    with pytest.raises(DaemonUnavailableError) as info:
        channel.call("Lookup", {"layout_id": LAYOUT.layout_id, "block_hashes": []})
    assert info.value.code == "DEADLINE_EXCEEDED"
    channel.close()
    listener.close()


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "grpc"])
def test_offsets_are_never_handed_to_a_client_of_an_earlier_daemon(daemon: DaemonProcess, fast_path: bool) -> None:
    """A client that mapped the arena of a daemon since restarted must not get offsets into the
    new arena (it would write into the old file and commit whatever the new slot holds), even
    when another client has registered the same layout with the new daemon."""
    with daemon.client(fast_path=fast_path) as stale:
        stale.register_layout(LAYOUT)
        daemon.restart()
        with daemon.client() as fresh:
            fresh.register_layout(LAYOUT)
            for call in (lambda: stale.reserve(LAYOUT.layout_id, HASHES[:1]), lambda: stale.acquire(LAYOUT.layout_id, HASHES[:1])):
                with pytest.raises((LayoutError, DaemonUnavailableError)):
                    call()
            # Registering again maps the new arena, and the calls work.
            stale.register_layout(LAYOUT)
            assert stale.write_blocks(LAYOUT.layout_id, {HASHES[0]: b"y" * LAYOUT.block_nbytes}) == {HASHES[0]: ReserveStatus.RESERVED}
            assert fresh.read_blocks(LAYOUT.layout_id, HASHES[:1]) == [b"y" * LAYOUT.block_nbytes]


def test_stale_fast_path_connection_says_so(daemon: DaemonProcess) -> None:
    """Over the fast path, a pooled connection to the old daemon is broken; a new one's Hello
    names the old arena and is refused with a message that says what to do."""
    with daemon.client() as stale:
        reg = stale.register_layout(LAYOUT)
        instance = reg.daemon_instance
        daemon.restart()
        with daemon.client() as fresh:
            fresh.register_layout(LAYOUT)
        channel = FastChannel(str(fast_socket(daemon)), "stale", instance, timeout_s=5)
        with pytest.raises(LayoutError, match="register the layout again"):
            channel.call("Lookup", {"layout_id": LAYOUT.layout_id, "block_hashes": []})
        channel.close()


def test_a_client_of_a_restarted_daemon_is_told_to_register_again(daemon: DaemonProcess) -> None:
    """Its pooled connections died with the old daemon; the call is retried on a new connection,
    whose Hello names the old arena, so the client hears "register again" (what the connector's
    link acts on at once), not "daemon down" (which would make it back off)."""
    with daemon.client() as client:
        client.register_layout(LAYOUT)
        assert client.lookup(LAYOUT.layout_id, HASHES) == []  # a pooled connection now exists
        daemon.restart()
        with pytest.raises(LayoutError, match="register the layout again"):
            client.lookup(LAYOUT.layout_id, HASHES)
        client.register_layout(LAYOUT)
        assert client.lookup(LAYOUT.layout_id, HASHES) == []
