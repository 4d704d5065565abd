"""Conversions between wire messages and domain types shared by the servicer and the client."""

from __future__ import annotations

from kvtier.blocks.layout import KVLayout
from kvtier.v1 import daemon_pb2 as pb


def layout_from_proto(message: pb.LayoutDescriptor) -> KVLayout:
    return KVLayout(
        model=message.model,
        model_revision=message.model_revision,
        dtype=message.dtype,
        num_layers=message.num_layers,
        num_kv_heads=message.num_kv_heads,
        head_size=message.head_size,
        head_size_v=None if message.head_size_v < 0 else message.head_size_v,
        block_size=message.block_size,
        tp_rank=message.tp_rank,
        tp_size=message.tp_size or 1,
        pp_rank=message.pp_rank,
        pp_size=message.pp_size or 1,
        page_layout=message.page_layout or "LBHNC",
        kv_format=message.kv_format or "kv_concat",
        extra=tuple(sorted(message.extra.items())),
    )


def layout_to_proto(layout: KVLayout) -> pb.LayoutDescriptor:
    return pb.LayoutDescriptor(
        model=layout.model,
        model_revision=layout.model_revision,
        dtype=layout.dtype,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_size=layout.head_size,
        head_size_v=-1 if layout.head_size_v is None else layout.head_size_v,
        block_size=layout.block_size,
        tp_rank=layout.tp_rank,
        tp_size=layout.tp_size,
        pp_rank=layout.pp_rank,
        pp_size=layout.pp_size,
        page_layout=layout.page_layout,
        kv_format=layout.kv_format,
        extra=dict(layout.extra),
    )
