"""Page copies between vLLM's paged KV cache and the host arena.

One interface, two backends (see ``docs/copy.md``)::

    from kvtier.copy import describe_paged_kv, make_page_copier

    kv = describe_paged_kv(kv_caches)            # once, at register_kv_caches()
    copier = make_page_copier(device)            # CUDA kernel if built, else PyTorch
    handle = copier.gather(kv, block_ids, arena, offsets)   # blocks -> arena slots
    ...
    if handle.done(): ...                        # never blocks; handle.wait() blocks

Arena slot format: a block's pages in layer order, back to back (:mod:`kvtier.copy.layout`).
Names are imported lazily so that ``python -m kvtier.copy.build`` works without PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.copy.base import (
        CompletedHandle,
        CopyHandle,
        CudaEventHandle,
        PageCopier,
    )
    from kvtier.copy.cuda_backend import CudaKernelPageCopier
    from kvtier.copy.factory import make_page_copier
    from kvtier.copy.layout import (
        Direction,
        PagedKV,
        PageInfo,
        describe_paged_kv,
        plan_segments,
    )
    from kvtier.copy.torch_backend import TorchPageCopier

_EXPORTS = {
    "CopyHandle": "kvtier.copy.base",
    "CompletedHandle": "kvtier.copy.base",
    "CudaEventHandle": "kvtier.copy.base",
    "PageCopier": "kvtier.copy.base",
    "CudaKernelPageCopier": "kvtier.copy.cuda_backend",
    "make_page_copier": "kvtier.copy.factory",
    "Direction": "kvtier.copy.layout",
    "PagedKV": "kvtier.copy.layout",
    "PageInfo": "kvtier.copy.layout",
    "describe_paged_kv": "kvtier.copy.layout",
    "plan_segments": "kvtier.copy.layout",
    "TorchPageCopier": "kvtier.copy.torch_backend",
}

__all__ = [
    "CompletedHandle",
    "CopyHandle",
    "CudaEventHandle",
    "CudaKernelPageCopier",
    "Direction",
    "PageCopier",
    "PageInfo",
    "PagedKV",
    "TorchPageCopier",
    "describe_paged_kv",
    "make_page_copier",
    "plan_segments",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier.copy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
