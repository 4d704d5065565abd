"""Dead, slow, lying and unauthenticated peers: each is a miss (then a recompute), never a hang
and never a bad block in the puller."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from kvtier.testing.daemon import free_port, wait_until
from kvtier.v1 import peer_pb2 as pb
from kvtier.v1 import peer_pb2_grpc as pb_grpc
from tests.transport.conftest import LAYOUT, TOKEN, KillingForwarder, PeerPair, prompt_hashes

pytestmark = pytest.mark.timeout(180)

TRANSPORTS = ["nixl", "tcp"]


def _skip_without(transport: str) -> None:
    if transport == "nixl":
        pytest.importorskip("nixl")


def _assert_nothing_partial(pair: PeerPair, hashes: list[bytes], data: dict[bytes, bytes]) -> int:
    """Whatever B holds of ``hashes`` now reads back exactly as A wrote it; returns how many."""
    got = pair.client_b.read_blocks(LAYOUT.layout_id, hashes)
    assert got == [data[h] for h in hashes[: len(got)]]
    return len(got)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_holder_killed_in_the_middle_of_a_fetch_is_a_miss_not_a_hang(peer_pair, transport: str) -> None:
    _skip_without(transport)
    blocks = 256  # 64 MiB: a READ of it takes tens of milliseconds here
    port_a = free_port()
    if transport == "nixl":  # the offer (~11 KB) goes through the forwarder; kill A just after it, while B reads A's arena
        forwarder = KillingForwarder(port_a, kill_after=3000, kill_delay_s=0.001)
        env_a = {"KVTIER_PEER_ADVERTISE_ADDRESS": f"127.0.0.1:{forwarder.port}"}
        forwarders = [forwarder]
    else:  # A advertises 127.0.0.2: its offers via one forwarder, its block stream via one that kills it 4 MiB in
        stream_port = free_port()
        offers = KillingForwarder(port_a, kill_after=1 << 40, listen=("127.0.0.2", 0))
        forwarder = KillingForwarder(stream_port, kill_after=4 << 20, listen=("127.0.0.2", stream_port))
        env_a = {"KVTIER_PEER_ADVERTISE_ADDRESS": f"127.0.0.2:{offers.port}", "KVTIER_PEER_STREAM_PORT": str(stream_port)}
        forwarders = [offers, forwarder]
    pair = peer_pair(transport, transport, port_a=port_a, host_capacity="256MiB", env_a=env_a,
                     env_b={"KVTIER_PEER_TIMEOUT_S": "3", "KVTIER_PEER_BACKOFF_S": "30"})
    for each in forwarders:
        each.daemon = pair.a
    try:
        hashes = prompt_hashes(blocks, seed=11)
        data = pair.fill_a(hashes)
        assert pair.wait_b_sees_peer(hashes)
        started = time.monotonic()
        host_blocks, _ = pair.client_b.prefetch(LAYOUT.layout_id, hashes, wait_s=10)
        elapsed = time.monotonic() - started
        assert forwarder.killed.is_set() and wait_until(lambda: pair.a.process.poll() is not None, timeout=5)
        assert elapsed < 3 + 2, f"the fetch outlived its 3 s deadline: {elapsed:.1f}s"
        assert host_blocks < blocks
        assert _assert_nothing_partial(pair, hashes, data) == host_blocks
        host = next(t for t in pair.client_b.stats().chain.tiers if t.name == "host")
        assert host.used_bytes == host_blocks * LAYOUT.block_nbytes  # the aborted slots went back
        stats = pair.peer_stats(pair.client_b)
        assert stats["errors"] >= 1 and stats["hits"] + stats["misses"] >= blocks
        # A dead holder is backed off: the lookup no longer offers its blocks as a peer run.
        assert "peer" not in pair.client_b.lookup(LAYOUT.layout_id, hashes)
        assert pair.b.process.poll() is None  # B is fine
    finally:
        for each in forwarders:
            each.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_holder_serving_corrupted_bytes_is_detected_and_counted(peer_pair, transport: str) -> None:
    _skip_without(transport)
    pair = peer_pair(transport, transport)
    hashes = prompt_hashes(8, seed=12)
    data = pair.fill_a(hashes)
    grant = pair.client_a.acquire(LAYOUT.layout_id, hashes)
    pair.client_a.release(grant.lease_id)
    arena = next(Path(pair.a.root).glob("kvtier-*-arena"))
    with open(arena, "r+b") as f:  # flip bytes of block 3 in A's arena after it was committed
        f.seek(grant.blocks[3].offset + 100)
        f.write(bytes(b ^ 0xFF for b in f.read(16)))
        f.flush()
    assert pair.wait_b_sees_peer(hashes)
    host_blocks, _ = pair.client_b.prefetch(LAYOUT.layout_id, hashes, wait_s=10)
    assert host_blocks == 3  # the blocks before the bad one arrived intact; none after it is loadable
    assert _assert_nothing_partial(pair, hashes, data) == 3
    assert pair.client_b.lookup(LAYOUT.layout_id, hashes) == ["host"] * 3  # the liar is backed off
    stats = pair.peer_stats(pair.client_b)
    assert stats["corrupt"] == 1 and stats["errors"] == 1
    assert "corrupt" in pair.b.log()


def test_an_unauthenticated_peer_gets_nothing(peer_pair) -> None:
    pair = peer_pair("tcp", "tcp", env_b={"KVTIER_PEER_AUTH_TOKEN": "not-the-fleet-token-000"})
    hashes = prompt_hashes(4, seed=13)
    pair.fill_a(hashes)
    assert pair.wait_b_sees_peer(hashes)
    assert pair.client_b.prefetch(LAYOUT.layout_id, hashes, wait_s=5) == (0, True)
    stats = pair.peer_stats(pair.client_b)
    assert stats["hits"] == 0 and stats["errors"] == 1
    assert "(refused)" in pair.b.log()
    # The same from a plain gRPC client: no token, a wrong token, never an offer or an offset.
    address = f"127.0.0.1:{pair.a.env['KVTIER_DAEMON_TCP_ADDRESS'].rsplit(':', 1)[1]}"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.KVTierPeerStub(channel)
        request = pb.OfferRequest(layout_id=LAYOUT.layout_id, block_hashes=b"".join(hashes), puller="intruder", ttl_s=5,
                                  want_nixl=True)
        for metadata in ((), (("authorization", "Bearer wrong-token-0123456789"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Offer(request, timeout=5, metadata=metadata)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        offer = stub.Offer(request, timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert len(offer.blocks) == 4  # the right token is served (and the offer leased until its TTL)
    assert pair.client_a.stats().chain.active_leases >= 1


def test_a_hung_holder_ends_at_the_deadline_and_is_backed_off(peer_pair) -> None:
    pair = peer_pair("tcp", "tcp", env_b={"KVTIER_PEER_TIMEOUT_S": "1", "KVTIER_PEER_BACKOFF_S": "30"})
    hashes = prompt_hashes(4, seed=14)
    pair.fill_a(hashes)
    assert pair.wait_b_sees_peer(hashes)
    pair.a.pause()  # takes connections, answers nothing
    try:
        started = time.monotonic()
        assert pair.client_b.prefetch(LAYOUT.layout_id, hashes, wait_s=10) == (0, True)
        assert time.monotonic() - started < 1 + 2
        assert pair.client_b.lookup(LAYOUT.layout_id, hashes) == []  # backed off for 30 s
        started = time.monotonic()
        assert pair.client_b.prefetch(LAYOUT.layout_id, hashes, wait_s=10) == (0, True)
        assert time.monotonic() - started < 0.5  # no second wait on it
        stats = pair.peer_stats(pair.client_b)
        assert stats["errors"] == 1 and "(timeout)" in pair.b.log()
    finally:
        pair.a.resume()
    # B could not release its offer on the hung A: A's lease ends at its TTL (B's timeout + 5 s).
    assert wait_until(lambda: pair.client_a.stats().chain.active_leases == 0, timeout=20)
    pair.a.stop(signal.SIGTERM)


class _LyingPeer(pb_grpc.KVTierPeerServicer):
    """A peer that offers what it was not asked for (``lie``: wrong-size, other-block, extra)."""

    def __init__(self, lie: str) -> None:
        self.lie = lie
        self.reads = 0

    def Offer(self, request, context):
        hashes = [request.block_hashes[i:i + 16] for i in range(0, len(request.block_hashes), 16)]
        nbytes = LAYOUT.block_nbytes // 2 if self.lie == "wrong-size" else LAYOUT.block_nbytes
        if self.lie == "other-block":
            hashes = hashes[::-1]
        if self.lie == "extra":
            hashes = hashes + hashes
        return pb.OfferResponse(lease_id=7, ttl_s=5, instance="liar",
                                blocks=[pb.OfferedBlock(block_hash=h, offset=i * nbytes, nbytes=nbytes, checksum=1) for i, h in enumerate(hashes)])

    def Read(self, request, context):
        self.reads += 1
        yield from ()

    def Release(self, request, context):
        return pb.ReleaseOfferResponse()


@pytest.mark.parametrize("lie", ["wrong-size", "other-block", "extra"])
def test_a_peer_that_offers_the_wrong_blocks_or_layout_is_refused_before_any_transfer(peer_pair, lie: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from kvtier.events.model import BlockEvent, IndexTier, NodeInfo, Op, PublishBatch, ServedLayout, Space, index_keys
    from kvtier.index.redis_store import RedisStore, redis_client

    pair = peer_pair("tcp", "tcp")
    liar = _LyingPeer(lie)
    server = grpc.server(ThreadPoolExecutor(2))
    pb_grpc.add_KVTierPeerServicer_to_server(liar, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    store = RedisStore(redis_client(pair.redis_url), pair.namespace)
    try:
        hashes = prompt_hashes(4, seed=15)
        event = BlockEvent(Op.STORED, IndexTier.HOST, Space(LAYOUT.model, LAYOUT.block_size), LAYOUT.layout_id, index_keys(hashes))
        store.publish(PublishBatch("liar", "s1", 1, reset=True, events=[event]))
        store.heartbeat(NodeInfo("liar", "s1", 1, address=f"127.0.0.1:{port}",
                                 layouts=[ServedLayout(LAYOUT.layout_id, LAYOUT.model, LAYOUT.block_size)]))
        assert pair.wait_b_sees_peer(hashes)
        assert pair.client_b.prefetch(LAYOUT.layout_id, hashes, wait_s=5) == (0, True)
        assert liar.reads == 0  # refused on the offer: not a byte was read
        stats = pair.peer_stats(pair.client_b)
        assert stats["hits"] == 0 and stats["errors"] == 1 and "(invalid)" in pair.b.log()
        assert pair.client_b.lookup(LAYOUT.layout_id, hashes) == []  # and backed off
    finally:
        server.stop(0)
        store.close()


@pytest.mark.parametrize("client_ca", ["fleet-ca", "another-ca"])
def test_peers_with_mutual_tls_and_no_token(peer_pair, tmp_path: Path, client_ca: str) -> None:
    """Holders require a client certificate from the fleet's CA: B with one pulls, B with a
    certificate from another CA gets nothing."""
    certs = pytest.importorskip("tests.certs")
    fleet = certs.make_ca("fleet-ca")
    files = {"ca.crt": certs.ca_pem(fleet)}
    files["server.key"], files["server.crt"] = certs.issue(fleet, "kvtier-daemon")
    files["client.key"], files["client.crt"] = certs.issue(fleet if client_ca == "fleet-ca" else certs.make_ca("another-ca"), "node-b")
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    listener = {"KVTIER_DAEMON_TLS_CERT_FILE": str(tmp_path / "server.crt"), "KVTIER_DAEMON_TLS_KEY_FILE": str(tmp_path / "server.key"),
                "KVTIER_DAEMON_TLS_CLIENT_CA_FILE": str(tmp_path / "ca.crt")}
    puller = {**listener, "KVTIER_PEER_TLS_CA_FILE": str(tmp_path / "ca.crt"), "KVTIER_PEER_TLS_CERT_FILE": str(tmp_path / "client.crt"),
              "KVTIER_PEER_TLS_KEY_FILE": str(tmp_path / "client.key")}
    pair = peer_pair("tcp", "tcp", env_a=listener, env_b=puller, token="")
    hashes = prompt_hashes(4, seed=16)
    data = pair.fill_a(hashes)
    assert pair.wait_b_sees_peer(hashes)
    host_blocks, _ = pair.client_b.prefetch(LAYOUT.layout_id, hashes, wait_s=5)
    if client_ca == "fleet-ca":
        assert host_blocks == 4 and pair.client_b.read_blocks(LAYOUT.layout_id, hashes) == [data[h] for h in hashes]
    else:
        assert host_blocks == 0 and pair.peer_stats(pair.client_b)["errors"] == 1
