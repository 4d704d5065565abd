"""Typed, batched client of the node daemon (what the vLLM connector uses).

Control calls go over gRPC (a Unix socket locally, or TCP with a bearer token and optional TLS);
block bytes go through the daemon's shared-memory arena, which the client maps once. A local
client, once it has registered a layout, sends the hot calls (lookup, reserve, commit, abort,
acquire, release, prefetch, disconnect) over the daemon's fast path instead
(``kvtier.client.fast_channel``): same semantics and errors, a fraction of gRPC's cost per call.

Every call has a deadline (``timeout_s``); gRPC errors are translated into kvtier errors here, at
the boundary: an unreachable or slow daemon is :class:`DaemonUnavailableError`, which callers on
the engine's step treat as a miss.

Reads are verified: :meth:`DaemonClient.read_blocks` checks each block's XXH3-64 against the
checksum the daemon recorded at commit, so bytes that changed in the arena are never returned.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtier.blocks.checksum import payload_checksum
from kvtier.blocks.layout import KVLayout
from kvtier.chain.promotion import FetchBudget
from kvtier.chain.stats import ChainStats, TierCounters, TierStats
from kvtier.client.commit_pipeline import COMMIT_CHUNK_BYTES, CommitPipeline
from kvtier.client.fast_channel import FastChannel
from kvtier.client.status import error_for_status
from kvtier.client.types import (
    DaemonStats,
    FetchResult,
    LeasedBlock,
    LeaseGrant,
    PendingCommit,
    RegisteredLayout,
    Reservation,
    ReserveStatus,
)
from kvtier.daemon.client_counters import ClientCounters
from kvtier.daemon.wire import layout_to_proto
from kvtier.errors import CorruptBlockError, DaemonUnavailableError, LayoutError
from kvtier.events.model import PublisherStatus
from kvtier.tiers.arena import SharedArena
from kvtier.v1 import daemon_pb2 as pb
from kvtier.v1 import daemon_pb2_grpc as pb_grpc

# The wire's numbers (the proto enum; the fast path sends the same numbers).
_RESERVE_STATUS = {pb.RESERVED: ReserveStatus.RESERVED, pb.ALREADY_PRESENT: ReserveStatus.ALREADY_PRESENT, pb.NO_SPACE: ReserveStatus.NO_SPACE}


# Reconnect quickly to a restarted daemon (gRPC's default first back-off is a second or more).
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000)]


def _target_of(target: str | Path) -> str:
    text = str(target)
    if text.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return text
    if text.startswith("/") or text.startswith(".") or isinstance(target, Path):
        return f"unix:{Path(text).absolute()}"
    return text  # host:port


def _error_of(method: str, exc: grpc.RpcError) -> Exception:
    """The kvtier error of a failed gRPC call."""
    return error_for_status(exc.code().name, f"{method}: {exc.details() or exc.code().name}")


class DaemonClient:
    """A connection to one daemon. Thread-safe (gRPC channels are); one per process is enough."""

    def __init__(
        self,
        target: str | Path,
        *,
        token: str | None = None,
        tls_root_certificates: bytes | None = None,
        tls_client_cert: tuple[bytes, bytes] | None = None,  # (key, cert) for mutual TLS
        timeout_s: float = 5.0,
        client_id: str | None = None,
        fast_path: bool = True,  # use the daemon's fast path when it offers one (local clients only)
    ) -> None:
        self.target = _target_of(target)
        self.timeout_s = timeout_s
        self.use_fast_path = fast_path and self.target.startswith("unix:")
        self._fast: FastChannel | None = None
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls_root_certificates is not None or tls_client_cert is not None:
            key, cert = tls_client_cert or (None, None)
            credentials = grpc.ssl_channel_credentials(tls_root_certificates, key, cert)
            self._channel = grpc.secure_channel(self.target, credentials, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.KVTierDaemonStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._arena: SharedArena | None = None
        self._arena_path: str | None = None
        self._daemon_instance: str | None = None

    def _call(self, method: str, request: object, timeout_s: float | None = None) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error_of(method, exc) from None
        except ValueError as exc:  # grpc's "Cannot invoke RPC on closed channel!": closed by another thread
            raise DaemonUnavailableError(f"{method}: this client was closed ({exc})", code="UNAVAILABLE") from None

    # ---- control plane -----------------------------------------------------------------------

    def health(self) -> bool:
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def register_layout(self, layout: KVLayout, prefill_tokens_per_s: float = 0.0) -> RegisteredLayout:
        """Register ``layout`` (idempotent), reporting the engine's measured prefill rate if known."""
        reply = self._call("RegisterLayout", pb.RegisterLayoutRequest(layout=layout_to_proto(layout), expected_layout_id=layout.layout_id,
                                                                      prefill_tokens_per_s=prefill_tokens_per_s))
        if reply.daemon_instance != self._daemon_instance:
            if self._arena is not None:
                # A restarted daemon: its arena is a new file. Unmapping the old one (and freeing
                # its pages) can take a while for a large arena: not on the caller's thread.
                threading.Thread(target=self._arena.close, name="kvtier-unmap", daemon=True).start()
                self._arena = None
            if self._fast is not None:
                self._fast.close()
                self._fast = None
            if self.use_fast_path and reply.fast_socket_path:
                self._fast = FastChannel(reply.fast_socket_path, self.client_id, reply.daemon_instance, self.timeout_s)
        self._daemon_instance = reply.daemon_instance
        self._arena_path = reply.arena_path
        return RegisteredLayout(reply.layout_id, reply.block_nbytes, reply.arena_path, reply.arena_nbytes, reply.daemon_instance,
                                reply.prefill_tokens_per_s, reply.wants_block_descriptions)

    def describe_blocks(self, blocks: Sequence[tuple[bytes, bytes | None, Sequence[int], str | None]]) -> None:
        """Tell the daemon the token ids of blocks it stores, ``(hash, parent hash, tokens, LoRA
        name)`` each, for its vLLM KV events (only when it asked: ``wants_block_descriptions``)."""
        request = pb.DescribeBlocksRequest(blocks=[
            pb.BlockDescription(block_hash=h, parent_hash=parent or b"", token_ids=tokens, lora_name=lora or "")
            for h, parent, tokens, lora in blocks
        ])
        self._call("DescribeBlocks", request)

    @property
    def daemon_instance(self) -> str | None:
        """The run of the daemon this client registered with (and whose arena it maps)."""
        return self._daemon_instance

    @property
    def fast_path_active(self) -> bool:
        """Whether the hot calls go over the daemon's fast path (after a layout was registered)."""
        return self._fast is not None

    def lookup(self, layout_id: str, block_hashes: Sequence[bytes], timeout_s: float | None = None, refresh: bool = False) -> list[str]:
        """The tier of each leading block the daemon holds (the list stops at the first miss).
        ``timeout_s`` overrides the client's deadline for this call; ``refresh`` marks the blocks
        found as just used (see ``LookupRequest``)."""
        if self._fast is not None:
            request = {"layout_id": layout_id, "block_hashes": list(block_hashes), "refresh": refresh}
            return self._fast.call("Lookup", request, timeout_s)["tiers"]
        return list(self._call("Lookup", pb.LookupRequest(layout_id=layout_id, block_hashes=block_hashes, refresh=refresh), timeout_s).tiers)

    def reserve(self, layout_id: str, block_hashes: Sequence[bytes], block_nbytes: int = 0) -> list[Reservation]:
        if self._fast is not None:
            results = self._fast.call("Reserve", {"layout_id": layout_id, "block_hashes": list(block_hashes), "block_nbytes": block_nbytes})["results"]
            # [status, offset, nbytes, reservation_id], or [status] when nothing was reserved
            return [Reservation(h, _RESERVE_STATUS[r[0]], *(r[1:] or (0, 0, 0))) for h, r in zip(block_hashes, results)]
        reply = self._call("Reserve", pb.ReserveRequest(client_id=self.client_id, layout_id=layout_id, block_hashes=block_hashes,
                                                        block_nbytes=block_nbytes, daemon_instance=self._daemon_instance or ""))
        return [
            Reservation(h, _RESERVE_STATUS[r.status], r.slot.offset, r.slot.nbytes, r.slot.reservation_id)
            for h, r in zip(block_hashes, reply.results)
        ]

    def commit(self, reservation_ids: Sequence[int], checksums: Sequence[int] | None = None) -> int:
        return self.commit_async(reservation_ids, checksums).result()

    def commit_async(self, reservation_ids: Sequence[int], checksums: Sequence[int] | None = None) -> PendingCommit:
        """Send a commit and return at once; its ``result()`` waits and returns the count
        committed (or raises). ``checksums``: the XXH3-64 of each slot as written
        (:func:`kvtier.blocks.payload_checksum`), computed while the bytes are hot in the writer's
        cache; without them the daemon reads the slots again to compute them."""
        if self._fast is not None:
            fields: dict = {"reservation_ids": list(reservation_ids)}
            if checksums is not None:
                fields["checksums"] = list(checksums)
            pending = self._fast.start("Commit", fields)
            return PendingCommit(lambda: pending.result()["committed"])
        request = pb.CommitRequest(client_id=self.client_id, reservation_ids=reservation_ids, checksums=checksums or ())
        future = self._stub.Commit.future(request, timeout=self.timeout_s, metadata=self._metadata)

        def wait() -> int:
            try:
                return future.result().committed
            except grpc.RpcError as exc:
                raise _error_of("Commit", exc) from None

        return PendingCommit(wait)

    def commit_pipeline(self, reservations: Sequence[Reservation], chunk_nbytes: int = COMMIT_CHUNK_BYTES) -> CommitPipeline:
        """Commit ``reservations`` chunk by chunk as the caller fills them (``filled(...)``), so one
        chunk's commit overlaps the copy of the next (``kvtier.client.commit_pipeline``)."""
        return CommitPipeline(self, reservations, chunk_nbytes)

    def abort(self, reservation_ids: Sequence[int]) -> int:
        if self._fast is not None:
            return self._fast.call("Abort", {"reservation_ids": list(reservation_ids)})["aborted"]
        return self._call("Abort", pb.AbortRequest(client_id=self.client_id, reservation_ids=reservation_ids)).aborted

    def acquire(self, layout_id: str, block_hashes: Sequence[bytes], ttl_s: float = 0, timeout_s: float | None = None) -> LeaseGrant:
        if self._fast is not None:
            reply = self._fast.call("Acquire", {"layout_id": layout_id, "block_hashes": list(block_hashes), "ttl_ms": int(ttl_s * 1000)},
                                    timeout_s)
            blocks = tuple(LeasedBlock(*slot) for slot in reply["slots"])
            return LeaseGrant(reply["lease_id"], blocks, reply["expires_in_ms"] / 1000)
        grpc_reply = self._call("Acquire", pb.AcquireRequest(client_id=self.client_id, layout_id=layout_id, block_hashes=block_hashes,
                                                             ttl_ms=int(ttl_s * 1000), daemon_instance=self._daemon_instance or ""), timeout_s)
        blocks = tuple(LeasedBlock(s.block_hash, s.offset, s.nbytes, s.checksum) for s in grpc_reply.slots)
        return LeaseGrant(grpc_reply.lease_id, blocks, grpc_reply.expires_in_ms / 1000)

    def release(self, lease_id: int) -> None:
        if self._fast is not None:
            self._fast.call("Release", {"lease_id": lease_id})
            return
        self._call("Release", pb.ReleaseRequest(client_id=self.client_id, lease_id=lease_id))

    def prefetch(self, layout_id: str, block_hashes: Sequence[bytes], wait_s: float = 0, timeout_s: float | None = None) -> tuple[int, bool]:
        """Start promoting blocks into host memory; wait up to ``wait_s`` for it to finish. Returns
        (leading blocks in host memory now, whether promotion finished). The call's deadline is
        ``timeout_s`` (default: the client's) beyond ``wait_s``."""
        deadline = (self.timeout_s if timeout_s is None else timeout_s) + wait_s
        if self._fast is not None:
            reply = self._fast.call("Prefetch", {"layout_id": layout_id, "block_hashes": list(block_hashes), "wait_ms": int(wait_s * 1000)},
                                    timeout_s=deadline)
            return reply["host_blocks"], reply["done"]
        grpc_reply = self._call("Prefetch", pb.PrefetchRequest(layout_id=layout_id, block_hashes=block_hashes, wait_ms=int(wait_s * 1000)),
                                timeout_s=deadline)
        return grpc_reply.host_blocks, grpc_reply.done

    def fetch(self, layout_id: str, block_hashes: Sequence[bytes], budget: FetchBudget, *, max_wait_s: float,
              lease_ttl_s: float = 0, timeout_s: float | None = None) -> FetchResult:
        """Promote blocks into host memory for a waiting request and lease the leading run that
        arrived, in one call: the daemon waits while ``budget`` allows (and at most ``max_wait_s``),
        re-judging each time a block arrives. The call's deadline is ``max_wait_s`` plus the
        client's ``timeout_s`` (or ``timeout_s``)."""
        wait_ms = max(1, int(max_wait_s * 1000))
        block_us, allowance_us = int(budget.block_s * 1e6), max(1, int(budget.allowance_s * 1e6))
        timeout_s = (self.timeout_s if timeout_s is None else timeout_s) + max_wait_s
        if self._fast is not None:
            reply = self._fast.call("Prefetch", {"layout_id": layout_id, "block_hashes": list(block_hashes), "wait_ms": wait_ms,
                                                 "block_us": block_us, "allowance_us": allowance_us, "lease": True,
                                                 "lease_ttl_ms": int(lease_ttl_s * 1000)}, timeout_s=timeout_s)
            grant = (LeaseGrant(reply["lease_id"], tuple(LeasedBlock(*slot) for slot in reply["slots"]), reply["expires_in_ms"] / 1000)
                     if "lease_id" in reply else None)
            return FetchResult(reply["host_blocks"], reply["done"], reply["gave_up"], grant)
        request = pb.PrefetchRequest(layout_id=layout_id, block_hashes=block_hashes, wait_ms=wait_ms, block_us=block_us,
                                     allowance_us=allowance_us, lease=True, lease_ttl_ms=int(lease_ttl_s * 1000),
                                     client_id=self.client_id, daemon_instance=self._daemon_instance or "")
        grpc_reply = self._call("Prefetch", request, timeout_s=timeout_s)
        grant = None
        if grpc_reply.host_blocks:
            grant = LeaseGrant(grpc_reply.lease_id, tuple(LeasedBlock(s.block_hash, s.offset, s.nbytes, s.checksum) for s in grpc_reply.slots),
                               grpc_reply.expires_in_ms / 1000)
        return FetchResult(grpc_reply.host_blocks, grpc_reply.done, grpc_reply.gave_up, grant)

    def disconnect(self) -> tuple[int, int]:
        if self._fast is not None:
            reply = self._fast.call("Disconnect", {})
            return reply["released_leases"], reply["aborted_reservations"]
        grpc_reply = self._call("Disconnect", pb.DisconnectRequest(client_id=self.client_id))
        return grpc_reply.released_leases, grpc_reply.aborted_reservations

    def stats(self) -> DaemonStats:
        reply = self._call("Stats", pb.StatsRequest())
        tiers = tuple(
            TierStats(
                name=t.name, kind=t.kind, capacity_bytes=t.capacity_bytes or None, used_bytes=t.used_bytes, blocks=t.blocks,
                counters=TierCounters(
                    hits=t.hits, misses=t.misses, bytes_in=t.bytes_in, bytes_out=t.bytes_out, evictions=t.evictions,
                    dropped=t.dropped, demotions=t.demotions, promotions=t.promotions, corrupt=t.corrupt, errors=t.errors,
                ),
            )
            for t in reply.tiers
        )
        chain = ChainStats(tiers, reply.pending_demotions, reply.active_leases, reply.pinned_blocks)
        publish = None
        if reply.HasField("publish"):
            p = reply.publish
            publish = PublisherStatus(p.target, p.publishing, p.session, p.seq, p.pending_events, p.last_published_age_s,
                                      p.resyncs, p.last_error)
        clients = tuple(ClientCounters(c.client_id, c.role, dict(c.counters), dict(c.failures), c.age_s) for c in reply.clients)
        return DaemonStats(chain, reply.active_reservations, reply.uptime_s, reply.node, reply.version, publish, clients)

    def report_counters(self, role: str, counters: Mapping[str, int], failures: Mapping[str, int],
                        timeout_s: float | None = None) -> None:
        """Send this client's lifetime counters (and which of them count failures); ``kvtier stats``
        shows the latest report of every client."""
        self._call("ReportCounters", pb.ReportCountersRequest(client_id=self.client_id, role=role, counters=counters,
                                                              failures=failures), timeout_s)

    # ---- data plane --------------------------------------------------------------------------

    def arena(self, populate: bool = False) -> SharedArena:
        """The daemon's host arena, mapped on first use (after a register_layout call).

        ``populate`` maps every page at once (about 0.5 s per GiB, holding the GIL); otherwise
        each page costs a fault on its first use in this process."""
        if self._arena is None:
            if self._arena_path is None:
                raise LayoutError("register a layout before using the arena")
            self._arena = SharedArena.attach(self._arena_path, populate=populate)
        return self._arena

    def write_blocks(self, layout_id: str, blocks: Mapping[bytes, bytes]) -> dict[bytes, ReserveStatus]:
        """Store blocks through the arena: reserve, copy in place, commit (in chunks, overlapped
        with the copy). Returns each block's status."""
        reservations = self.reserve(layout_id, list(blocks))
        arena = self.arena()
        with self.commit_pipeline(reservations) as pipeline:
            for reservation in reservations:
                if reservation.status is ReserveStatus.RESERVED:
                    slot = arena.view(reservation.offset, reservation.nbytes)
                    slot[:] = blocks[reservation.block_hash]
                    pipeline.filled((reservation,), (payload_checksum(slot),))
        return {r.block_hash: r.status for r in reservations}

    def read_blocks(self, layout_id: str, block_hashes: Sequence[bytes]) -> list[bytes]:
        """Copy out the leading run of blocks held in host memory, each verified against its checksum."""
        grant = self.acquire(layout_id, block_hashes)
        try:
            arena = self.arena()
            out = []
            for block in grant.blocks:
                data = bytes(arena.view(block.offset, block.nbytes))
                if payload_checksum(data) != block.checksum:
                    raise CorruptBlockError(f"block {block.block_hash.hex()} changed in the arena after commit", tier="host")
                out.append(data)
            return out
        finally:
            self.release(grant.lease_id)

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._arena is not None:
            self._arena.close()
            self._arena = None
        self._channel.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
