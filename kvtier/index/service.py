"""The index's gRPC service: proto messages in, domain calls on a :class:`KVIndex`, proto out.

The only module that converts between ``kvtier.v1.index_pb2`` and the index's domain types, and
the one place index errors become gRPC status codes: malformed input is INVALID_ARGUMENT with a
message naming the field, an unreachable store is UNAVAILABLE; nothing a caller sends crashes it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from kvtier.errors import IndexUnavailableError, InvalidRequestError, KVTierError, TierUnavailableError
from kvtier.events.model import IndexTier
from kvtier.events.wire import decode_batch, decode_heartbeat
from kvtier.index import queries
from kvtier.index.base import ApplyStatus, KVIndex, NodeScore
from kvtier.index.queries import unpack_token_ids
from kvtier.v1 import index_pb2 as pb
from kvtier.v1 import index_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "kvtier.v1.KVIndex"

_Reply = TypeVar("_Reply")


def tier_to_proto(tier: IndexTier) -> int:
    return int(tier) + 1


def tier_from_proto(value: int) -> IndexTier:
    if not 1 <= value <= len(IndexTier):
        raise InvalidRequestError(f"unknown tier {value}")
    return IndexTier(value - 1)


def _rpc(method: Callable[..., _Reply]) -> Callable[..., _Reply]:
    """Translate kvtier errors into status codes (the one place this happens)."""

    @functools.wraps(method)
    def wrapper(self: IndexServicer, request: Any, context: grpc.ServicerContext) -> _Reply:
        try:
            return method(self, request, context)
        except InvalidRequestError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (IndexUnavailableError, TierUnavailableError) as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except KVTierError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        raise AssertionError("unreachable")  # context.abort raises

    return wrapper


def scores_to_proto(scores: list[NodeScore], prompt_blocks: int, block_size: int) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        scores=[
            pb.NodeScore(
                node=s.node, blocks=s.blocks, tokens=s.tokens, score=s.score,
                runs=[pb.TierRun(tier=tier_to_proto(r.tier), start_block=r.start, blocks=r.blocks) for r in s.runs],
            )
            for s in scores
        ],
        prompt_blocks=prompt_blocks,
        block_size=block_size,
    )


def _one_form(packed: bytes, repeated: Sequence[Any], field: str) -> Any:
    """A request field sent packed or repeated (not both)."""
    if packed and len(repeated):
        raise InvalidRequestError(f"send {field} or packed_{field}, not both")
    return packed or repeated


class IndexServicer(pb_grpc.KVIndexServicer):
    def __init__(self, index: KVIndex) -> None:
        self.index = index

    @_rpc
    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        token_ids = _one_form(request.packed_token_ids, request.token_ids, "token_ids")
        answer = queries.score(
            self.index, request.model, request.block_size,
            token_ids=unpack_token_ids(token_ids) if isinstance(token_ids, bytes) else token_ids,
            block_hashes=_one_form(request.packed_block_hashes, request.block_hashes, "block_hashes"),
            lora_name=request.lora_name, cache_salt=request.cache_salt, candidates=request.candidate_nodes,
        )
        return scores_to_proto(answer.scores, answer.prompt_blocks, answer.block_size)

    @_rpc
    def LookupBlocks(self, request: pb.LookupBlocksRequest, context: grpc.ServicerContext) -> pb.LookupBlocksResponse:
        found = queries.lookup(self.index, request.model, request.block_size,
                               _one_form(request.packed_block_hashes, request.block_hashes, "block_hashes"))
        return pb.LookupBlocksResponse(
            blocks=[pb.BlockHolders(holdings=[pb.Holding(node=h.node, tier=tier_to_proto(h.tier)) for h in held]) for held in found]
        )

    @_rpc
    def ListNodes(self, request: pb.ListNodesRequest, context: grpc.ServicerContext) -> pb.ListNodesResponse:
        nodes = []
        for status in self.index.nodes():
            info = status.info
            nodes.append(pb.NodeStatus(
                node=info.node, address=info.address, heartbeat_age_s=status.heartbeat_age_s, alive=status.alive,
                indexed_blocks=status.indexed_blocks, tier_blocks=info.tier_blocks, s3_location=info.s3_location,
                pending_events=info.pending_events, session=info.session, seq=info.seq,
                layouts=[pb.ServedLayout(layout_id=lay.layout_id, model=lay.model, block_size=lay.block_size,
                                         tp_rank=lay.tp_rank, tp_size=lay.tp_size) for lay in info.layouts],
            ))
        return pb.ListNodesResponse(nodes=nodes)

    @_rpc
    def Publish(self, request: pb.PublishRequest, context: grpc.ServicerContext) -> pb.PublishResponse:
        status = self.index.publish(decode_batch(request.batch))
        return pb.PublishResponse(resync=status is ApplyStatus.RESYNC)

    @_rpc
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.PublishResponse:
        status = self.index.heartbeat(decode_heartbeat(request.heartbeat))
        return pb.PublishResponse(resync=status is ApplyStatus.RESYNC)


def add_index_service(index: KVIndex, server: grpc.Server) -> IndexServicer:
    servicer = IndexServicer(index)
    pb_grpc.add_KVIndexServicer_to_server(servicer, server)
    return servicer
