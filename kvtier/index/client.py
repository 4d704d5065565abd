"""A typed client of ``kvtier index serve`` (or of a daemon's own index): for routers and publishers.

Routers call :meth:`IndexClient.score` with token ids (the index hashes them with kvtier's spec)
or block hashes and get :class:`NodeScore` objects back, best first. Given the index's
``fast_address``, scores and lookups go over its fast path (:mod:`kvtier.index.fast_server`),
~0.6 ms less per call than gRPC; everything else stays on gRPC. Long inputs travel packed
either way. Daemons publish through :meth:`IndexClient.publish` and :meth:`IndexClient.heartbeat`,
which makes the client a publish sink like any :class:`KVIndex`. gRPC and fast-path errors
become kvtier errors here.
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from kvtier.blocks.hashing import NO_EXTRAS, HashExtras
from kvtier.client.fast_channel import FrameChannel, FrameConnection
from kvtier.errors import AuthenticationError, IndexServiceError, IndexUnavailableError, InvalidRequestError
from kvtier.events.model import IndexTier, NodeInfo, PublishBatch, ServedLayout
from kvtier.events.wire import encode_batch, encode_heartbeat
from kvtier.index.base import ApplyStatus, Holding, NodeScore, NodeStatus, TierRun
from kvtier.index.fast_server import host_and_port
from kvtier.index.queries import pack_token_ids
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


def _error_of(code: str, message: str) -> Exception:
    """The kvtier error of a failed index call, from its status name (either transport)."""
    error_type = _ERROR_OF.get(code)
    if error_type is InvalidRequestError:
        return InvalidRequestError(message)
    return (error_type or IndexServiceError)(message, code=code)


def _client_tls_context(root_certificates: bytes | None, client_cert: tuple[bytes, bytes] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=root_certificates.decode() if root_certificates else None)
    if client_cert is not None:
        key, cert = client_cert
        # load_cert_chain reads files only: the PEM goes through a private temporary file (0600), removed at once.
        fd, path = tempfile.mkstemp(prefix="kvtier-client-cert-")
        try:
            with os.fdopen(fd, "wb") as chain:
                chain.write(cert + b"\n" + key)
            context.load_cert_chain(path)
        finally:
            os.unlink(path)
    return context


class _FastPath(FrameChannel):
    """Pooled TCP (or TLS) connections to the index's fast path."""

    peer = "the index"
    limit_setting = "the index's fast-path message limit"
    unavailable = IndexUnavailableError

    def __init__(self, address: str, token: str | None, tls: ssl.SSLContext | None, timeout_s: float) -> None:
        super().__init__(timeout_s)
        self.address = address
        self.host, self.port = host_and_port(address, "fast_address")
        self._token = token
        self._tls = tls

    def _connect(self) -> FrameConnection:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(None)  # FrameConnection sets the kernel's timeouts instead
        except OSError as exc:  # ssl.SSLError included
            raise IndexUnavailableError(f"cannot reach the index's fast path at {self.address}: {exc}", code="UNAVAILABLE") from None
        return FrameConnection(sock, f"the index at {self.address}", self.timeout_s,
                               unavailable=IndexUnavailableError, timed_out=IndexUnavailableError)

    def _hello_fields(self) -> dict[str, Any]:
        return {"token": self._token} if self._token else {}

    def _error(self, code: str, message: str) -> Exception:
        return _error_of(code, message)


def index_target(address: str | Path) -> str:
    """A gRPC target from ``host:port``, ``unix:/path`` or a socket path."""
    text = str(address)
    if text.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return text
    if text.startswith(("/", ".")) or isinstance(address, Path):
        return f"unix:{Path(text).absolute()}"
    return text


def _packed(block_hashes: Sequence[bytes] | bytes) -> bytes | list[bytes]:
    """16-byte hashes concatenated (one field to build and parse); other lengths (8-byte index
    keys) stay a list, which the index also takes."""
    if isinstance(block_hashes, bytes) or not block_hashes:
        return bytes(block_hashes)
    if set(map(len, block_hashes)) == {16}:
        return b"".join(block_hashes)
    return list(block_hashes)


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
        fast_address: str | None = None,  # the index's index.fast_address: scores and lookups go there
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
        self._fast: _FastPath | None = None
        if fast_address:
            tls = None
            if tls_root_certificates is not None or tls_client_cert is not None:
                tls = _client_tls_context(tls_root_certificates, tls_client_cert)
            self._fast = _FastPath(fast_address, token, tls, timeout_s)

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code().name
            raise _error_of(code, f"index {method} at {self.target}: {exc.details() or code}") from None

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
        if extras.multimodal:
            raise InvalidRequestError("the index service hashes text prompts; hash multimodal prompts yourself and send block_hashes")
        packed_tokens = pack_token_ids(token_ids) if len(token_ids) else b""
        packed_hashes = _packed(block_hashes)
        if self._fast is not None:
            reply = self._fast.call("Score", {
                "model": model, "block_size": block_size, "token_ids": packed_tokens, "block_hashes": packed_hashes,
                "lora_name": extras.lora_name or "", "cache_salt": extras.cache_salt or "", "candidates": list(candidates),
            })
            return [NodeScore(node, blocks, tokens, [TierRun(IndexTier.parse(tier), start, n) for tier, start, n in runs], score)
                    for node, blocks, tokens, score, runs in reply["scores"]]
        request = pb.ScoreRequest(model=model, block_size=block_size, packed_token_ids=packed_tokens, lora_name=extras.lora_name or "",
                                  cache_salt=extras.cache_salt or "", candidate_nodes=candidates)
        if isinstance(packed_hashes, bytes):
            request.packed_block_hashes = packed_hashes
        else:
            request.block_hashes.extend(packed_hashes)
        reply = self._call("Score", request)
        return [
            NodeScore(s.node, s.blocks, s.tokens, [TierRun(tier_from_proto(r.tier), r.start_block, r.blocks) for r in s.runs], s.score)
            for s in reply.scores
        ]

    def lookup(self, model: str, block_hashes: Sequence[bytes], *, block_size: int = 0) -> list[list[Holding]]:
        """For each block hash, the live nodes and tiers holding it."""
        packed = _packed(block_hashes)
        if self._fast is not None:
            reply = self._fast.call("LookupBlocks", {"model": model, "block_size": block_size, "block_hashes": packed})
            return [[Holding(node, IndexTier.parse(tier)) for node, tier in holders] for holders in reply["blocks"]]
        request = pb.LookupBlocksRequest(model=model, block_size=block_size)
        if isinstance(packed, bytes):
            request.packed_block_hashes = packed
        else:
            request.block_hashes.extend(packed)
        reply = self._call("LookupBlocks", request)
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
        if self._fast is not None:
            self._fast.close()
        self._channel.close()

    def __enter__(self) -> IndexClient:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
