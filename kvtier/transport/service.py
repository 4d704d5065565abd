"""The holder's side of peer fetches: the ``KVTierPeer`` gRPC service on the daemon's TCP listener.

Only on the TCP listener, so only behind its authentication (bearer token or mutual TLS): an
unauthenticated caller never learns an offset or the NIXL metadata that opens the arena.

Invariants:

- An offer pins its blocks through a lease owned by ``peer:<puller>``; only that puller can read
  or release it, and it expires after the TTL the puller asked for (capped), so a puller that
  dies mid-transfer never pins anything for long.
- Read streams only blocks of a live lease: their slots cannot have been reused. (A lease that
  expired mid-stream ends the stream with an error rather than send reused bytes.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from kvtier.blocks.hashing import BLOCK_HASH_BYTES
from kvtier.daemon.core import DaemonCore, LeasedSlot
from kvtier.daemon.servicer import _rpc
from kvtier.errors import InvalidRequestError, LayoutError, LeaseError
from kvtier.transport.base import NixlEndpoint
from kvtier.v1 import peer_pb2 as pb
from kvtier.v1 import peer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_LEASE_TTL_S = 120.0
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 16 << 20


def _lessee(puller: str) -> str:
    if not puller or len(puller) > 240:
        raise InvalidRequestError("puller must name the pulling node (1 to 240 characters)")
    return f"peer:{puller}"


class PeerServicer(pb_grpc.KVTierPeerServicer):
    def __init__(self, core: DaemonCore, *, nixl: NixlEndpoint | None = None, max_wait_s: float = 1.0) -> None:
        self.core = core
        self.nixl = nixl
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._offers: dict[int, tuple[str, tuple[LeasedSlot, ...]]] = {}  # lease id -> (lessee, slots)
        self.offered_blocks = 0  # pinned for a peer (it may then read them over NIXL or the stream)
        self.served_blocks = 0  # streamed over the TCP path

    def _forget_dead_offers(self) -> None:
        with self._lock:
            dead = [lease for lease, (lessee, _) in self._offers.items() if not self.core.holds_lease(lessee, lease)]
            for lease in dead:
                del self._offers[lease]

    @_rpc
    def Offer(self, request: pb.OfferRequest, context: grpc.ServicerContext) -> pb.OfferResponse:
        lessee = _lessee(request.puller)
        if len(request.block_hashes) % BLOCK_HASH_BYTES:
            raise InvalidRequestError(f"block_hashes must be {BLOCK_HASH_BYTES}-byte hashes back to back")
        hashes = [request.block_hashes[i:i + BLOCK_HASH_BYTES] for i in range(0, len(request.block_hashes), BLOCK_HASH_BYTES)]
        if not 0 < request.ttl_s <= MAX_LEASE_TTL_S:
            raise InvalidRequestError(f"ttl_s must be in (0, {MAX_LEASE_TTL_S}], got {request.ttl_s}")
        self._forget_dead_offers()
        reply = pb.OfferResponse(instance=self.core.instance)
        try:
            self.core.layout(request.layout_id)
        except LayoutError:
            return reply  # no engine of that layout ever registered here: nothing held
        wait_s = min(max(request.wait_s, 0.0), self.max_wait_s)
        outcome = self.core.prefetch(request.layout_id, hashes, wait_s, lease_for=lessee, lease_ttl_s=request.ttl_s,
                                     from_peers=False)
        if outcome.lease is None:
            return reply
        lease = outcome.lease
        with self._lock:
            self._offers[lease.lease_id] = (lessee, lease.slots)
            self.offered_blocks += len(lease.slots)
        reply.lease_id = lease.lease_id
        reply.ttl_s = lease.ttl_s
        reply.blocks.extend(pb.OfferedBlock(block_hash=s.block_hash, offset=s.offset, nbytes=s.nbytes, checksum=s.checksum)
                            for s in lease.slots)
        if request.want_nixl and self.nixl is not None:
            reply.nixl.CopyFrom(pb.NixlEndpoint(agent=self.nixl.agent, metadata=self.nixl.metadata,
                                                arena_base=self.nixl.arena_base, backend=self.nixl.backend))
        return reply

    def _offered(self, lessee: str, lease_id: int) -> tuple[LeasedSlot, ...]:
        with self._lock:
            found = self._offers.get(lease_id)
        if found is None or found[0] != lessee or not self.core.holds_lease(lessee, lease_id):
            raise LeaseError(f"offer {lease_id} is unknown to {lessee!r}: never made, released or expired")
        return found[1]

    def Read(self, request: pb.ReadRequest, context: grpc.ServicerContext) -> Iterator[pb.BlockChunk]:
        try:
            lessee = _lessee(request.puller)
            slots = self._offered(lessee, request.lease_id)
            if request.first + request.count > len(slots) or request.count == 0:
                raise InvalidRequestError(f"blocks {request.first}..{request.first + request.count - 1} are not in an "
                                          f"offer of {len(slots)}")
        except (InvalidRequestError, LeaseError) as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, InvalidRequestError) else grpc.StatusCode.FAILED_PRECONDITION
            context.abort(code, str(exc))
        chunk = min(request.chunk_bytes or DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES)
        return self._stream(lessee, request.lease_id, slots, request.first, request.count, chunk, context)

    def _stream(self, lessee: str, lease_id: int, slots: tuple[LeasedSlot, ...], first: int, count: int, chunk: int,
                context: Any) -> Iterator[pb.BlockChunk]:
        arena = self.core.chain.host.arena
        for index in range(first, first + count):
            slot = slots[index]
            if not self.core.holds_lease(lessee, lease_id):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"offer {lease_id} expired during the transfer")
            view = arena.view(slot.offset, slot.nbytes)
            for start in range(0, slot.nbytes, chunk):
                yield pb.BlockChunk(index=index, start=start, data=bytes(view[start:start + chunk]))
            with self._lock:
                self.served_blocks += 1

    @_rpc
    def Release(self, request: pb.ReleaseOfferRequest, context: grpc.ServicerContext) -> pb.ReleaseOfferResponse:
        lessee = _lessee(request.puller)
        with self._lock:
            found = self._offers.get(request.lease_id)
            if found is not None and found[0] == lessee:
                del self._offers[request.lease_id]
        self.core.release(lessee, request.lease_id)
        return pb.ReleaseOfferResponse()


def add_peer_service(servicer: PeerServicer, server: grpc.Server) -> None:
    pb_grpc.add_KVTierPeerServicer_to_server(servicer, server)
