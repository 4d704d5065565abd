"""A typed client of ``kvtier index serve`` (or of a daemon's own index): for routers and publishers.

Routers call :meth:`IndexClient.score` with token ids (the index hashes them with kvtier's spec)
or block hashes and get :class:`NodeScore` objects back, best first. Daemons publish through
:meth:`IndexClient.publish` and :meth:`IndexClient.heartbeat`, which makes the client a
publish sink like any :class:`KVIndex`. gRPC errors become kvtier errors here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

from kvtier.blocks.hashing import NO_EXTRAS, HashExtras
from kvtier.errors import AuthenticationError, IndexServiceError, IndexUnavailableError, InvalidRequestError
from kvtier.events.model import NodeInfo, PublishBatch, ServedLayout
from kvtier.events.wire import encode_batch, encode_heartbeat
from kvtier.index.base import ApplyStatus, Holding, NodeScore, NodeStatus, TierRun
from kvtier.index.service import tier_from_proto
from kvtier.v1 import index_pb2 as pb
from kvtier.v1 import index_pb2_grpc as pb_grpc

_ERROR_OF = {
    "INVALID_ARGUMENT": InvalidRequestError,
    "UNAVAILABLE": IndexUnavailableError,
    "DEADLINE_EXCEEDED": IndexUnavailableError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": AuthenticationError,
}


def index_target(address: str | Path) -> str:
    """A gRPC target from ``host:port``, ``unix:/path`` or a socket path."""
    text = str(address)
    if text.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return text
    if text.startswith(("/", ".")) or isinstance(address, Path):
        return f"unix:{Path(text).absolute()}"
    return text


class IndexClient:
    """One channel to an index. Thread-safe."""

    def __init__(
        self,
        address: str | Path,
        *,
        token: str | None = None,
        tls_root_certificates: bytes | None = None,
        tls_client_cert: tuple[bytes, bytes] | None = None,  # (private key, certificate) for mTLS
        timeout_s: float = 5.0,
    ) -> None:
        self.target = index_target(address)
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls_root_certificates is not None or tls_client_cert is not None:
            key, cert = tls_client_cert or (None, None)
            self._channel = grpc.secure_channel(self.target, grpc.ssl_channel_credentials(tls_root_certificates, key, cert))
        else:
            self._channel = grpc.insecure_channel(self.target)
        self._stub = pb_grpc.KVIndexStub(self._channel)

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code().name
            message = f"index {method} at {self.target}: {exc.details() or code}"
            error_type = _ERROR_OF.get(code)
            if error_type is AuthenticationError:
                raise AuthenticationError(message, code=code) from None
            if error_type is InvalidRequestError:
                raise InvalidRequestError(message) from None
            raise (error_type or IndexServiceError)(message, code=code) from None

    def score(
        self,
        model: str,
        *,
        token_ids: Sequence[int] = (),
        block_hashes: Sequence[bytes] = (),
        block_size: int = 0,
        extras: HashExtras = NO_EXTRAS,
        candidates: Sequence[str] = (),
    ) -> list[NodeScore]:
        """Each node's cached prefix of the prompt, best first (nodes holding none are left out)."""
        request = pb.ScoreRequest(model=model, block_size=block_size, token_ids=token_ids, block_hashes=block_hashes,
                                  lora_name=extras.lora_name or "", cache_salt=extras.cache_salt or "",
                                  candidate_nodes=candidates)
        if extras.multimodal:
            raise InvalidRequestError("the index service hashes text prompts; hash multimodal prompts yourself and send block_hashes")
        reply = self._call("Score", request)
        return [
            NodeScore(s.node, s.blocks, s.tokens, [TierRun(tier_from_proto(r.tier), r.start_block, r.blocks) for r in s.runs], s.score)
            for s in reply.scores
        ]

    def lookup(self, model: str, block_hashes: Sequence[bytes], *, block_size: int = 0) -> list[list[Holding]]:
        reply = self._call("LookupBlocks", pb.LookupBlocksRequest(model=model, block_size=block_size, block_hashes=block_hashes))
        return [[Holding(h.node, tier_from_proto(h.tier)) for h in block.holdings] for block in reply.blocks]

    def nodes(self) -> list[NodeStatus]:
        reply = self._call("ListNodes", pb.ListNodesRequest())
        statuses = []
        for n in reply.nodes:
            layouts = [ServedLayout(lay.layout_id, lay.model, lay.block_size, lay.tp_rank, lay.tp_size) for lay in n.layouts]
            info = NodeInfo(n.node, n.session, n.seq, n.address, n.s3_location, layouts, dict(n.tier_blocks), n.pending_events)
            statuses.append(NodeStatus(info, n.heartbeat_age_s, n.alive, dict(n.indexed_blocks)))
        return statuses

    def publish(self, batch: PublishBatch) -> ApplyStatus:
        reply = self._call("Publish", pb.PublishRequest(batch=encode_batch(batch)))
        return ApplyStatus.RESYNC if reply.resync else ApplyStatus.OK

    def heartbeat(self, info: NodeInfo) -> ApplyStatus:
        reply = self._call("Heartbeat", pb.HeartbeatRequest(heartbeat=encode_heartbeat(info)))
        return ApplyStatus.RESYNC if reply.resync else ApplyStatus.OK

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> IndexClient:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
