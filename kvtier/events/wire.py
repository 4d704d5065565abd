"""kvtier's own encoding of publish batches and heartbeats: msgpack arrays, keys as one blob.

Used by every publisher (gRPC to ``kvtier index serve``, or straight into Redis) and every index
backend, so both ends share one definition. Layout (version 1)::

    batch     = [1, node, session, seq, reset, [event, ...]]
    event     = [op, tier, model, block_size, source, keys]     keys: 8 bytes per key, big-endian
    heartbeat = [1, node, session, seq, address, s3_location, [layout, ...], {tier: blocks}, pending]
    layout    = [layout_id, model, block_size, tp_rank, tp_size]

Decoding checks every field and raises :class:`InvalidRequestError` naming the bad one; nothing
malformed reaches an index. No pickle: msgpack with ``strict_map_key`` and no extension types.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from kvtier.errors import InvalidRequestError
from kvtier.events.model import (
    INDEX_KEY_BYTES,
    BlockEvent,
    IndexTier,
    NodeInfo,
    Op,
    PublishBatch,
    ServedLayout,
    Space,
)

WIRE_VERSION = 1
MAX_NAME_CHARS = 512


def pack_keys(keys: list[int]) -> bytes:
    return struct.pack(f">{len(keys)}Q", *keys)


def unpack_keys(blob: bytes) -> list[int]:
    if len(blob) % INDEX_KEY_BYTES:
        raise InvalidRequestError(f"event keys must be {INDEX_KEY_BYTES} bytes each; got a blob of {len(blob)} bytes")
    return list(struct.unpack(f">{len(blob) // INDEX_KEY_BYTES}Q", blob))


def encode_batch(batch: PublishBatch) -> bytes:
    events = [
        [int(e.op), int(e.tier), e.space.model, e.space.block_size, e.source, pack_keys(e.keys)] for e in batch.events
    ]
    return msgpack.packb([WIRE_VERSION, batch.node, batch.session, batch.seq, batch.reset, events], use_bin_type=True)


def decode_batch(payload: bytes) -> PublishBatch:
    fields = _unpack(payload, "publish batch", 6)
    _, node, session, seq, reset, events = fields
    batch = PublishBatch(_name(node, "node"), _name(session, "session"), _count(seq, "seq"), _flag(reset, "reset"))
    if not isinstance(events, list):
        raise InvalidRequestError("publish batch: events must be a list")
    for position, event in enumerate(events):
        batch.events.append(_event(event, position))
    return batch


def encode_heartbeat(info: NodeInfo) -> bytes:
    layouts = [[lay.layout_id, lay.model, lay.block_size, lay.tp_rank, lay.tp_size] for lay in info.layouts]
    return msgpack.packb(
        [WIRE_VERSION, info.node, info.session, info.seq, info.address, info.s3_location, layouts,
         dict(info.tier_blocks), info.pending_events],
        use_bin_type=True,
    )


def decode_heartbeat(payload: bytes) -> NodeInfo:
    _, node, session, seq, address, s3_location, layouts, tier_blocks, pending = _unpack(payload, "heartbeat", 9)
    if not isinstance(layouts, list) or not isinstance(tier_blocks, dict):
        raise InvalidRequestError("heartbeat: layouts must be a list and tier_blocks a map")
    served = []
    for layout in layouts:
        if not isinstance(layout, list) or len(layout) != 5:
            raise InvalidRequestError("heartbeat: each layout is [layout_id, model, block_size, tp_rank, tp_size]")
        layout_id, model, block_size, tp_rank, tp_size = layout
        space = Space(_name(model, "layout model"), _count(block_size, "layout block_size"))
        served.append(ServedLayout(_name(layout_id, "layout_id"), space.model, space.block_size,
                                   _count(tp_rank, "tp_rank"), _count(tp_size, "tp_size")))
    blocks = {_name(tier, "tier"): _count(count, "tier blocks") for tier, count in tier_blocks.items()}
    return NodeInfo(_name(node, "node"), _name(session, "session"), _count(seq, "seq"), _text(address, "address"),
                    _text(s3_location, "s3_location"), served, blocks, _count(pending, "pending_events"))


def _unpack(payload: bytes, what: str, length: int) -> list[Any]:
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad bytes
        raise InvalidRequestError(f"{what}: not valid msgpack ({exc})") from exc
    if not isinstance(fields, list) or not fields:
        raise InvalidRequestError(f"{what}: expected a msgpack array")
    if fields[0] != WIRE_VERSION:
        raise InvalidRequestError(f"{what}: wire version {fields[0]!r} is not supported (this kvtier speaks {WIRE_VERSION})")
    if len(fields) != length:
        raise InvalidRequestError(f"{what}: expected {length} fields, got {len(fields)}")
    return fields


def _event(event: Any, position: int) -> BlockEvent:
    where = f"publish batch event {position}"
    if not isinstance(event, list) or len(event) != 6:
        raise InvalidRequestError(f"{where}: expected [op, tier, model, block_size, source, keys]")
    op, tier, model, block_size, source, keys = event
    try:
        op, tier = Op(op), IndexTier(tier)
    except ValueError as exc:
        raise InvalidRequestError(f"{where}: {exc}") from None
    if not isinstance(keys, bytes):
        raise InvalidRequestError(f"{where}: keys must be a binary blob")
    space = Space(_name(model, "model"), _count(block_size, "block_size"))
    return BlockEvent(op, tier, space, _name(source, "source"), unpack_keys(keys))


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise InvalidRequestError(f"{what} must be a non-empty string of at most {MAX_NAME_CHARS} characters, got {value!r:.80}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
        raise InvalidRequestError(f"{what} must be a string of at most {MAX_NAME_CHARS} characters")
    return value


def _count(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise InvalidRequestError(f"{what} must be a non-negative integer, got {value!r:.80}")
    return value


def _flag(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise InvalidRequestError(f"{what} must be true or false, got {value!r:.80}")
    return value
