"""Bad input gets a clear status and the daemon keeps serving, over gRPC and over the fast path
(whose raw-frame cases are in test_fast_path.py)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys

import grpc
import pytest

from kvtier.blocks import hash_prompt
from kvtier.client import DaemonClient, ReserveStatus
from kvtier.errors import AuthenticationError, CorruptBlockError, DaemonError, InvalidRequestError, LayoutError, LeaseError
from kvtier.v1 import daemon_pb2 as pb
from tests.daemon.conftest import LAYOUT, DaemonProcess, start_on_tcp

HASHES = hash_prompt(list(range(16 * 4)), 16)


@pytest.fixture(params=[True, False], ids=["fast-path", "grpc"])
def client(daemon: DaemonProcess, request: pytest.FixtureRequest):
    with daemon.client(fast_path=request.param) as client:
        client.register_layout(LAYOUT)
        assert client.fast_path_active is request.param
        yield client
        assert client.health(), "the daemon must still be serving"
        assert client.lookup(LAYOUT.layout_id, HASHES[:1]) in ([], ["host"])


def test_unknown_layout(client: DaemonClient) -> None:
    with pytest.raises(LayoutError, match="not registered"):
        client.lookup("00000000deadbeef", HASHES)
    with pytest.raises(LayoutError):
        client.reserve("00000000deadbeef", HASHES)


def test_invalid_layout_descriptor(client: DaemonClient) -> None:
    bad = pb.LayoutDescriptor(model="m", dtype="float64", num_layers=1, num_kv_heads=1, head_size=1, block_size=1)
    with pytest.raises(LayoutError, match="unknown KV dtype"):
        client._call("RegisterLayout", pb.RegisterLayoutRequest(layout=bad))
    mismatch = pb.RegisterLayoutRequest(layout=pb.LayoutDescriptor(model="m", dtype="float16", num_layers=1,
                                                                   num_kv_heads=1, head_size=8, block_size=16, head_size_v=-1),
                                        expected_layout_id="0123456789abcdef")
    with pytest.raises(LayoutError, match="different kvtier versions"):
        client._call("RegisterLayout", mismatch)


def test_wrong_sizes_and_hashes(client: DaemonClient) -> None:
    with pytest.raises(InvalidRequestError, match="does not match layout"):
        client.reserve(LAYOUT.layout_id, HASHES, block_nbytes=LAYOUT.block_nbytes + 1)
    with pytest.raises(InvalidRequestError, match="block hash #1 is 3 bytes"):
        client.lookup(LAYOUT.layout_id, [HASHES[0], b"abc"])
    with pytest.raises(InvalidRequestError, match="client_id"):
        client._call("Reserve", pb.ReserveRequest(client_id="", layout_id=LAYOUT.layout_id, block_hashes=HASHES))


def test_unknown_slots_and_double_commit(client: DaemonClient) -> None:
    with pytest.raises(InvalidRequestError, match="unknown"):
        client.commit([123456789])
    reservations = client.reserve(LAYOUT.layout_id, HASHES[:2])
    ids = [r.reservation_id for r in reservations]
    with pytest.raises(InvalidRequestError, match="twice"):
        client.commit([ids[0], ids[0]])
    client.commit(ids)
    with pytest.raises(InvalidRequestError, match="unknown"):
        client.commit(ids)  # double commit
    with pytest.raises(InvalidRequestError, match="unknown"):
        client.abort(ids)


def test_writer_checksums_must_match_the_reservations(client: DaemonClient) -> None:
    ids = [r.reservation_id for r in client.reserve(LAYOUT.layout_id, HASHES[:2])]
    with pytest.raises(InvalidRequestError, match="checksums for 2 reservations"):
        client.commit(ids, checksums=[1])
    with pytest.raises((InvalidRequestError, ValueError)):  # the daemon refuses it; protobuf refuses to encode it
        client.commit(ids, checksums=[1, -1])
    client.abort(ids)  # a refused commit changed nothing: the reservations are still there


def test_a_lying_writer_checksum_makes_the_block_a_miss_for_readers(client: DaemonClient) -> None:
    """The daemon records the writer's checksum as given; readers verify the bytes against it."""
    (reservation,) = client.reserve(LAYOUT.layout_id, HASHES[3:4])
    client.register_layout(LAYOUT)
    client.arena().view(reservation.offset, reservation.nbytes)[:] = b"\x07" * reservation.nbytes
    client.commit([reservation.reservation_id], checksums=[12345])
    with pytest.raises(CorruptBlockError):
        client.read_blocks(LAYOUT.layout_id, HASHES[3:4])


def test_a_client_cannot_touch_another_clients_slots(daemon: DaemonProcess, client: DaemonClient) -> None:
    reservation = client.reserve(LAYOUT.layout_id, HASHES[2:3])[0]
    assert reservation.status is ReserveStatus.RESERVED
    with daemon.client(client_id="intruder") as other:
        other.register_layout(LAYOUT)
        with pytest.raises(InvalidRequestError):
            other.commit([reservation.reservation_id])
    client.abort([reservation.reservation_id])


def test_unknown_lease(client: DaemonClient) -> None:
    with pytest.raises(LeaseError):
        client.release(987654321)


def test_oversized_message(client: DaemonClient) -> None:
    huge = [os.urandom(16) for _ in range(500_000)]  # 9 MB > the 8 MiB limit
    with pytest.raises(DaemonError) as info:
        client.lookup(LAYOUT.layout_id, huge)
    assert info.value.code == "RESOURCE_EXHAUSTED"


def test_too_many_blocks(client: DaemonClient) -> None:
    with pytest.raises(InvalidRequestError, match="limit"):
        client.lookup(LAYOUT.layout_id, [os.urandom(16) for _ in range(70_000)])


def test_malformed_bytes(daemon: DaemonProcess, client: DaemonClient) -> None:
    with grpc.insecure_channel(f"unix:{daemon.socket_path}") as channel:
        raw = channel.unary_unary("/kvtier.v1.KVTierDaemon/Lookup", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
        assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
        missing = channel.unary_unary("/kvtier.v1.KVTierDaemon/NoSuchMethod", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            missing(b"", timeout=5)
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_tcp_requires_authentication(daemon_root) -> None:
    token = secrets.token_urlsafe(24)
    daemon, port = start_on_tcp(daemon_root, extra_env={"KVTIER_DAEMON_AUTH_TOKEN": token})
    try:
        with DaemonClient(f"127.0.0.1:{port}") as anonymous:
            assert anonymous.health()  # probes need no credentials
            with pytest.raises(AuthenticationError, match="requires"):
                anonymous.stats()
        with DaemonClient(f"127.0.0.1:{port}", token="not-the-right-token") as wrong:
            with pytest.raises(AuthenticationError, match="not valid"):
                wrong.register_layout(LAYOUT)
        with DaemonClient(f"127.0.0.1:{port}", token=token) as right:
            assert right.register_layout(LAYOUT).layout_id == LAYOUT.layout_id
            assert right.stats().node
        with daemon.client() as local:  # the Unix socket needs no token
            assert local.stats().node
    finally:
        daemon.stop()


def test_tcp_without_credentials_refuses_to_start(daemon_root) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvtier", "serve", "--socket", str(daemon_root / "s.sock"), "--tcp", "127.0.0.1:0", "--no-metrics",
         "--host-capacity", "4MiB", "--no-disk"],
        capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")},
    )
    assert result.returncode == 2
    assert "unauthenticated" in result.stderr and "KVTIER_DAEMON_AUTH_TOKEN" in result.stderr


def test_a_tcp_port_in_use_is_a_clear_error(daemon_root) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "kvtier", "serve", "--socket", str(daemon_root / "s.sock"), "--tcp", address, "--no-metrics",
             "--host-capacity", "32MiB", "--no-disk"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "KVTIER_DAEMON_AUTH_TOKEN": secrets.token_urlsafe(24)},
        )
    assert result.returncode == 2
    assert f"daemon.tcp_address '{address}': cannot listen there" in result.stderr and "Traceback" not in result.stderr


def test_bad_configuration_is_reported(daemon_root) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvtier", "serve", "--socket", str(daemon_root / "s.sock"), "--host-capacity", "lots"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "host.capacity" in result.stderr and "Traceback" not in result.stderr
