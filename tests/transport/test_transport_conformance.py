"""What every PeerTransport does (kvtier.transport.base): the offered bytes land in the target
slots, for any selection of an offer's blocks; a failure is a PeerError, never another exception.

The holder is a real daemon (in this process, listening on TCP with a token); the puller side is
a host tier of its own with each transport over a real PeerChannel.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import pytest

from kvtier.blocks.keys import BlockKey
from kvtier.client import DaemonClient
from kvtier.config import HostTierConfig, load_config
from kvtier.daemon.auth import BearerTokenInterceptor
from kvtier.daemon.server import DaemonServer
from kvtier.testing.daemon import free_port
from kvtier.tiers.host import HostTier, Slot
from kvtier.transport.base import NixlEndpoint, PeerError, PeerTransport
from kvtier.transport.channel import PeerChannel, PeerCredentials
from kvtier.transport.nixl_path import NixlTransport, nixl_available
from kvtier.transport.service import PeerServicer, add_peer_service
from kvtier.transport.zmq_stream import BlockStreamServer, ZmqStreamTransport
from tests.transport.conftest import LAYOUT, TOKEN, payloads, prompt_hashes

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonServer, str]]:
    """A daemon holding blocks, and the address of its peer service (behind the token)."""
    root = tmp_path_factory.mktemp("holder")
    config = load_config(env={}, overrides={
        "daemon": {"socket_path": str(root / "d.sock"), "metrics_address": None, "node": "holder"},
        "host": {"capacity": "64MiB", "shm_dir": str(root)},
        "disk": {"enabled": False},
    })
    server = DaemonServer(config)
    server.start()
    # The daemon serves peers when it shares an index with them; here the service is mounted alone.
    nixl = NixlTransport(server.core.chain.host.arena, agent_name="holder-agent") if nixl_available() else None
    peer_server = grpc.server(ThreadPoolExecutor(4), interceptors=(BearerTokenInterceptor(TOKEN),))
    stream = BlockStreamServer(server.core, "127.0.0.1")
    service = PeerServicer(server.core, nixl=nixl.endpoint if nixl else None, stream=stream,
                           stream_endpoint=f"tcp://127.0.0.1:{stream.port}")
    add_peer_service(service, peer_server)
    peer_port = peer_server.add_insecure_port("127.0.0.1:0")
    peer_server.start()
    yield server, f"127.0.0.1:{peer_port}"
    peer_server.stop(0)
    service.close()
    if nixl is not None:
        nixl.close()
    server.stop()


@pytest.fixture(scope="module")
def puller_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostTier]:
    host = HostTier(HostTierConfig(capacity="64MiB", shm_dir=tmp_path_factory.mktemp("puller"), prefault=False))
    yield host
    host.close()


@pytest.fixture(params=["tcp", "nixl"])
def transport(request: pytest.FixtureRequest, puller_host: HostTier) -> Iterator[PeerTransport]:
    if request.param == "nixl":
        pytest.importorskip("nixl")
        made: PeerTransport = NixlTransport(puller_host.arena, agent_name=f"puller-{time.monotonic_ns()}")
    else:
        made = ZmqStreamTransport(puller_host)
    yield made
    made.close()


def _offer(holder: tuple[DaemonServer, str], hashes: list[bytes]):
    server, address = holder
    with DaemonClient(server.socket_path) as client:
        client.register_layout(LAYOUT)
        data = payloads(hashes)
        client.write_blocks(LAYOUT.layout_id, data)
    channel = PeerChannel("holder", address, PeerCredentials(token=TOKEN))
    offer = channel.offer(LAYOUT.layout_id, hashes, puller="puller", wait_s=0, ttl_s=30, want_nixl=True, timeout_s=5)
    assert [b.block_hash for b in offer.blocks] == hashes
    return channel, offer, data


def _slots(host: HostTier, count: int) -> list[Slot]:
    """Reserved slots to read into (aborted after each test)."""
    return [host.reserve(BlockKey(LAYOUT.layout_id, bytes([i]) * 16), LAYOUT.block_nbytes) for i in range(count)]


@pytest.mark.parametrize("selection", [[0, 1, 2, 3, 4, 5], [1, 3, 4], [5]])
def test_the_offered_bytes_land_in_the_slots(holder, puller_host: HostTier, transport: PeerTransport, selection: list[int]) -> None:
    hashes = prompt_hashes(6, seed=100 + len(selection))
    channel, offer, data = _offer(holder, hashes)
    assert transport.usable_for(offer)
    slots = _slots(puller_host, len(selection))
    try:
        transport.read(offer, selection, slots, time.monotonic() + 10)
        assert [bytes(puller_host.slot_view(s)) for s in slots] == [data[hashes[i]] for i in selection]
    finally:
        for slot in slots:
            puller_host.abort(slot)
        channel.release(offer, puller="puller", timeout_s=5)
        channel.close()


def test_a_failure_is_a_peer_error(holder, puller_host: HostTier, transport: PeerTransport) -> None:
    hashes = prompt_hashes(2, seed=200)
    channel, offer, _ = _offer(holder, hashes)
    channel.release(offer, puller="puller", timeout_s=5)
    if transport.name == "nixl":  # metadata that is not a NIXL agent's
        offer = replace(offer, nixl=NixlEndpoint("nobody", b"not metadata", 0, "UCX"))
    # (the TCP path: the offer was released, so its ticket opens nothing)
    slots = _slots(puller_host, 2)
    try:
        with pytest.raises(PeerError):
            transport.read(offer, [0, 1], slots, time.monotonic() + 5)
    finally:
        for slot in slots:
            puller_host.abort(slot)
        channel.close()
    unreachable = PeerChannel("gone", f"127.0.0.1:{free_port()}", PeerCredentials(token=TOKEN))
    with pytest.raises(PeerError) as failed:
        unreachable.offer(LAYOUT.layout_id, hashes, puller="puller", wait_s=0, ttl_s=5, want_nixl=False, timeout_s=2)
    assert failed.value.reason in ("unreachable", "timeout")
    unreachable.close()
