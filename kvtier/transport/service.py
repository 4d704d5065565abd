"""The holder's side of peer fetches: the ``KVTierPeer`` gRPC service on the daemon's TCP listener.

Only on the TCP listener, so only behind its authentication (bearer token or mutual TLS): an
unauthenticated caller never learns an offset, a block-stream ticket or the NIXL metadata that
opens the arena.

Invariants:

- An offer pins its blocks through a lease owned by ``peer:<puller>``; only that puller can
  release it, and it expires after the TTL the puller asked for (capped), so a puller that dies
  mid-transfer never pins anything for long.
- The block stream (``zmq_stream``) serves an offer's blocks only under its ticket and while its
  lease lives: their slots cannot have been reused.
"""

from __future__ import annotations

import grpc

from kvtier.blocks.hashing import BLOCK_HASH_BYTES
from kvtier.daemon.core import DaemonCore
from kvtier.daemon.servicer import _rpc
from kvtier.errors import InvalidRequestError, LayoutError
from kvtier.transport.base import NixlEndpoint
from kvtier.transport.zmq_stream import BlockStreamServer
from kvtier.v1 import peer_pb2 as pb
from kvtier.v1 import peer_pb2_grpc as pb_grpc

MAX_LEASE_TTL_S = 120.0


def _lessee(puller: str) -> str:
    if not puller or len(puller) > 240:
        raise InvalidRequestError("puller must name the pulling node (1 to 240 characters)")
    return f"peer:{puller}"


class PeerServicer(pb_grpc.KVTierPeerServicer):
    def __init__(self, core: DaemonCore, *, nixl: NixlEndpoint | None = None, stream: BlockStreamServer | None = None,
                 stream_endpoint: str = "", max_wait_s: float = 1.0) -> None:
        self.core = core
        self.nixl = nixl
        self.stream = stream
        self.stream_endpoint = stream_endpoint  # as pullers reach it ("tcp://advertised-host:port")
        self.max_wait_s = max_wait_s
        self.offered_blocks = 0  # pinned for a peer (it may then read them over NIXL or the stream)

    @property
    def served_blocks(self) -> int:
        """Blocks sent over the block stream (the TCP path)."""
        return self.stream.served_blocks if self.stream is not None else 0

    @_rpc
    def Offer(self, request: pb.OfferRequest, context: grpc.ServicerContext) -> pb.OfferResponse:
        lessee = _lessee(request.puller)
        if len(request.block_hashes) % BLOCK_HASH_BYTES:
            raise InvalidRequestError(f"block_hashes must be {BLOCK_HASH_BYTES}-byte hashes back to back")
        hashes = [request.block_hashes[i:i + BLOCK_HASH_BYTES] for i in range(0, len(request.block_hashes), BLOCK_HASH_BYTES)]
        if not 0 < request.ttl_s <= MAX_LEASE_TTL_S:
            raise InvalidRequestError(f"ttl_s must be in (0, {MAX_LEASE_TTL_S}], got {request.ttl_s}")
        reply = pb.OfferResponse(instance=self.core.instance)
        if not hashes:  # a hello: the puller sets up its connection (and NIXL's) before it needs one
            self._add_endpoints(reply, request.want_nixl)
            return reply
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
        self.offered_blocks += len(lease.slots)
        reply.lease_id = lease.lease_id
        reply.ttl_s = lease.ttl_s
        reply.blocks.extend(pb.OfferedBlock(block_hash=s.block_hash, offset=s.offset, nbytes=s.nbytes, checksum=s.checksum)
                            for s in lease.slots)
        if self.stream is not None:
            reply.ticket = self.stream.issue(lessee, lease.lease_id, lease.slots)
        self._add_endpoints(reply, request.want_nixl)
        return reply

    def _add_endpoints(self, reply: pb.OfferResponse, want_nixl: bool) -> None:
        if self.stream is not None:
            reply.stream_endpoint = self.stream_endpoint
        if want_nixl and self.nixl is not None:
            reply.nixl.CopyFrom(pb.NixlEndpoint(agent=self.nixl.agent, metadata=self.nixl.metadata,
                                                arena_base=self.nixl.arena_base, backend=self.nixl.backend))

    @_rpc
    def Release(self, request: pb.ReleaseOfferRequest, context: grpc.ServicerContext) -> pb.ReleaseOfferResponse:
        lessee = _lessee(request.puller)
        self.core.release(lessee, request.lease_id)  # raises LeaseError for another puller's offer
        if self.stream is not None:
            self.stream.revoke(request.lease_id)
        return pb.ReleaseOfferResponse()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def add_peer_service(servicer: PeerServicer, server: grpc.Server) -> None:
    pb_grpc.add_KVTierPeerServicer_to_server(servicer, server)
