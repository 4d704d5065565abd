"""A gRPC channel to one peer daemon's TCP listener, with this daemon's peer credentials.

Every call carries a deadline; gRPC failures become :class:`PeerError` with a reason the
fetcher counts (``refused`` for failed authentication, ``timeout``, ``unreachable``, ``failed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from kvtier.config import KVTierConfig
from kvtier.daemon.auth import read_setting_file, resolve_token
from kvtier.errors import ConfigError
from kvtier.transport.base import NixlEndpoint, Offer, OfferedBlock, PeerError
from kvtier.v1 import peer_pb2 as pb
from kvtier.v1 import peer_pb2_grpc as pb_grpc

_REASONS = {
    "UNAUTHENTICATED": "refused",
    "PERMISSION_DENIED": "refused",
    "DEADLINE_EXCEEDED": "timeout",
    "UNAVAILABLE": "unreachable",
    "CANCELLED": "timeout",
}
# An offer of up to 65536 blocks with NIXL metadata: room for it.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 2000)]


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """What this daemon presents to peers: a bearer token and/or TLS settings."""

    token: str | None = None
    tls_root_certificates: bytes | None = None
    tls_client_cert: tuple[bytes, bytes] | None = None  # (key, cert) for peers that require mutual TLS

    @classmethod
    def from_config(cls, config: KVTierConfig) -> PeerCredentials:
        """``peer.*`` settings, else the daemon's own token (one fleet token is the usual setup)."""
        peer = config.peer
        token = resolve_token(peer, "peer") if (peer.auth_token or peer.auth_token_file) else resolve_token(config.daemon)
        ca = read_setting_file(peer.tls_ca_file, "peer.tls_ca_file")
        cert = read_setting_file(peer.tls_cert_file, "peer.tls_cert_file")
        key = read_setting_file(peer.tls_key_file, "peer.tls_key_file")
        if (cert is None) != (key is None):
            raise ConfigError("set both peer.tls_cert_file and peer.tls_key_file for mutual TLS")
        return cls(token, ca, (key, cert) if cert is not None and key is not None else None)


class PeerChannel:
    """Calls to one peer (thread-safe: gRPC channels are)."""

    def __init__(self, node: str, address: str, credentials: PeerCredentials) -> None:
        self.node = node
        self.address = address
        self._metadata = (("authorization", f"Bearer {credentials.token}"),) if credentials.token else ()
        if credentials.tls_root_certificates is not None or credentials.tls_client_cert is not None:
            key, cert = credentials.tls_client_cert or (None, None)
            tls = grpc.ssl_channel_credentials(credentials.tls_root_certificates, key, cert)
            self._channel = grpc.secure_channel(address, tls, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.KVTierPeerStub(self._channel)

    def _error(self, method: str, exc: grpc.RpcError) -> PeerError:
        code = exc.code().name if exc.code() is not None else "UNKNOWN"
        return PeerError(f"peer {self.node} ({self.address}) {method}: {exc.details() or code}", peer=self.node,
                         reason=_REASONS.get(code, "failed"))

    def offer(self, layout_id: str, block_hashes: Sequence[bytes], *, puller: str, wait_s: float, ttl_s: float,
              want_nixl: bool, timeout_s: float) -> Offer:
        request = pb.OfferRequest(layout_id=layout_id, block_hashes=b"".join(block_hashes), puller=puller, wait_s=wait_s,
                                  ttl_s=ttl_s, want_nixl=want_nixl)
        try:
            reply = self._stub.Offer(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error("Offer", exc) from None
        nixl = None
        if reply.HasField("nixl"):
            nixl = NixlEndpoint(reply.nixl.agent, reply.nixl.metadata, reply.nixl.arena_base, reply.nixl.backend)
        blocks = tuple(OfferedBlock(b.block_hash, b.offset, b.nbytes, b.checksum) for b in reply.blocks)
        return Offer(self.node, reply.lease_id, reply.ttl_s, blocks, reply.instance, nixl, reply.stream_endpoint, reply.ticket)

    def release(self, offer: Offer, *, puller: str, timeout_s: float) -> None:
        try:
            self._stub.Release(pb.ReleaseOfferRequest(lease_id=offer.lease_id, puller=puller), timeout=timeout_s,
                               metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error("Release", exc) from None

    def close(self) -> None:
        self._channel.close()
