"""gRPC servicer of the daemon API: wire messages <-> DaemonCore calls.

The only module that imports generated types besides the client; kvtier errors become gRPC
status codes named by ``kvtier.daemon.status``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from kvtier import __version__
from kvtier.chain.promotion import FetchBudget
from kvtier.daemon.core import DaemonCore, ReserveStatus
from kvtier.daemon.metrics import RPC_LATENCY
from kvtier.daemon.status import status_name_of
from kvtier.daemon.wire import layout_from_proto
from kvtier.errors import KVTierError
from kvtier.v1 import daemon_pb2 as pb
from kvtier.v1 import daemon_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from kvtier.events.publisher import IndexPublisher

log = logging.getLogger(__name__)

_RESERVE_STATUS = {
    ReserveStatus.RESERVED: pb.RESERVED,
    ReserveStatus.ALREADY_PRESENT: pb.ALREADY_PRESENT,
    ReserveStatus.NO_SPACE: pb.NO_SPACE,
}

Handler = TypeVar("Handler", bound=Callable[..., Any])


def _rpc(handler: Handler) -> Handler:
    """Time the call and turn kvtier errors into gRPC statuses with the error's message."""
    method = handler.__name__

    @functools.wraps(handler)
    def wrapper(self: DaemonServicer, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        code = "OK"
        try:
            return handler(self, request, context)
        except KVTierError as exc:
            code = status_name_of(exc)
            context.abort(grpc.StatusCode[code], str(exc))
        except Exception:
            code = "INTERNAL"
            log.exception("%s failed", method)
            context.abort(grpc.StatusCode.INTERNAL, f"{method} failed inside the daemon; see its log")
        finally:
            RPC_LATENCY.labels(method=method, code=code).observe(time.perf_counter() - start)

    return wrapper  # type: ignore[return-value]


class DaemonServicer(pb_grpc.KVTierDaemonServicer):
    def __init__(self, core: DaemonCore, node: str, fast_socket_path: str = "") -> None:
        self.core = core
        self.node = node
        self.fast_socket_path = fast_socket_path  # advertised to clients; empty when disabled
        self.publisher: IndexPublisher | None = None  # set by the server when it publishes to an index

    @_rpc
    def RegisterLayout(self, request: pb.RegisterLayoutRequest, context: grpc.ServicerContext) -> pb.RegisterLayoutResponse:
        layout = self.core.register_layout(layout_from_proto(request.layout), request.expected_layout_id,
                                           prefill_tokens_per_s=request.prefill_tokens_per_s)
        arena = self.core.chain.host.arena
        return pb.RegisterLayoutResponse(
            layout_id=layout.layout_id,
            block_nbytes=layout.block_nbytes,
            arena_path=str(arena.path),
            arena_nbytes=arena.nbytes,
            daemon_instance=self.core.instance,
            fast_socket_path=self.fast_socket_path,
            prefill_tokens_per_s=self.core.prefill_rate(layout.layout_id),
            wants_block_descriptions=self.core.descriptions is not None,
        )

    @_rpc
    def DescribeBlocks(self, request: pb.DescribeBlocksRequest, context: grpc.ServicerContext) -> pb.DescribeBlocksResponse:
        self.core.describe_blocks([(b.block_hash, b.parent_hash or None, b.token_ids, b.lora_name) for b in request.blocks])
        return pb.DescribeBlocksResponse()

    @_rpc
    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        return pb.LookupResponse(tiers=self.core.lookup(request.layout_id, request.block_hashes, request.refresh))

    @_rpc
    def Reserve(self, request: pb.ReserveRequest, context: grpc.ServicerContext) -> pb.ReserveResponse:
        outcomes = self.core.reserve(request.client_id, request.layout_id, request.block_hashes, request.block_nbytes,
                                     daemon_instance=request.daemon_instance)
        results = []
        for outcome in outcomes:
            slot = None
            if outcome.slot is not None:
                slot = pb.Slot(
                    block_hash=outcome.block_hash,
                    offset=outcome.slot.offset,
                    nbytes=outcome.slot.nbytes,
                    reservation_id=outcome.slot.reservation,
                )
            results.append(pb.ReserveResult(status=_RESERVE_STATUS[outcome.status], slot=slot))
        return pb.ReserveResponse(results=results)

    @_rpc
    def Commit(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> pb.CommitResponse:
        checksums = list(request.checksums) or None
        return pb.CommitResponse(committed=self.core.commit(request.client_id, list(request.reservation_ids), checksums))

    @_rpc
    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(aborted=self.core.abort(request.client_id, list(request.reservation_ids)))

    @_rpc
    def Acquire(self, request: pb.AcquireRequest, context: grpc.ServicerContext) -> pb.AcquireResponse:
        outcome = self.core.acquire(request.client_id, request.layout_id, request.block_hashes, request.ttl_ms / 1000,
                                    daemon_instance=request.daemon_instance)
        return pb.AcquireResponse(
            lease_id=outcome.lease_id,
            slots=_slots_to_proto(outcome.slots),
            expires_in_ms=int(outcome.ttl_s * 1000),
        )

    @_rpc
    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        self.core.release(request.client_id, request.lease_id)
        return pb.ReleaseResponse()

    @_rpc
    def Prefetch(self, request: pb.PrefetchRequest, context: grpc.ServicerContext) -> pb.PrefetchResponse:
        budget = FetchBudget(request.block_us / 1e6, request.allowance_us / 1e6) if request.allowance_us else None
        outcome = self.core.prefetch(request.layout_id, request.block_hashes, request.wait_ms / 1000, budget=budget,
                                     lease_for=request.client_id if request.lease else None, lease_ttl_s=request.lease_ttl_ms / 1000,
                                     daemon_instance=request.daemon_instance)
        reply = pb.PrefetchResponse(host_blocks=outcome.host_blocks, done=outcome.done, gave_up=outcome.gave_up)
        if outcome.lease is not None:
            reply.lease_id = outcome.lease.lease_id
            reply.slots.extend(_slots_to_proto(outcome.lease.slots))
            reply.expires_in_ms = int(outcome.lease.ttl_s * 1000)
        return reply

    @_rpc
    def Disconnect(self, request: pb.DisconnectRequest, context: grpc.ServicerContext) -> pb.DisconnectResponse:
        leases, reservations = self.core.disconnect(request.client_id)
        return pb.DisconnectResponse(released_leases=leases, aborted_reservations=reservations)

    @_rpc
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        stats, reservations = self.core.stats()
        tiers = []
        for tier in stats.tiers:
            c = tier.counters
            tiers.append(pb.TierStats(
                name=tier.name, kind=tier.kind, capacity_bytes=tier.capacity_bytes or 0, used_bytes=tier.used_bytes,
                blocks=tier.blocks, hits=c.hits, misses=c.misses, bytes_in=c.bytes_in, bytes_out=c.bytes_out,
                evictions=c.evictions, dropped=c.dropped, demotions=c.demotions, promotions=c.promotions,
                corrupt=c.corrupt, errors=c.errors,
            ))
        return pb.StatsResponse(
            tiers=tiers,
            pending_demotions=stats.pending_demotions,
            active_leases=stats.active_leases,
            pinned_blocks=stats.pinned_blocks,
            active_reservations=reservations,
            uptime_s=time.time() - self.core.started_at,
            node=self.node,
            version=__version__,
            publish=self._publish_status(),
            clients=[pb.ClientCounters(client_id=c.client_id, role=c.role, counters=c.counters, failures=c.failures, age_s=c.age_s)
                     for c in self.core.client_counters.snapshot()],
        )

    @_rpc
    def ReportCounters(self, request: pb.ReportCountersRequest, context: grpc.ServicerContext) -> pb.ReportCountersResponse:
        self.core.report_counters(request.client_id, request.role, dict(request.counters), dict(request.failures))
        return pb.ReportCountersResponse()

    def _publish_status(self) -> pb.PublishStatus | None:
        publisher = self.publisher
        if publisher is None:
            return None
        s = publisher.status()
        return pb.PublishStatus(target=s.target, publishing=s.publishing, session=s.session, seq=s.seq,
                                pending_events=s.pending_events, last_published_age_s=s.last_published_age_s,
                                resyncs=s.resyncs, last_error=s.last_error)


def _slots_to_proto(slots) -> list[pb.Slot]:
    return [pb.Slot(block_hash=s.block_hash, offset=s.offset, nbytes=s.nbytes, checksum=s.checksum) for s in slots]
