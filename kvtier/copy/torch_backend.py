"""Pure-PyTorch page copies: the path of vLLM's CPU backend and the fallback without the kernel.

Per request it runs a handful of tensor ops per :class:`~kvtier.copy.layout.PageRun` (one run per
layer, or one per block in block-outermost layouts), never a Python loop per page, as long as the
slots sit on a fixed pitch (``offset = base + k * pitch``, ``pitch >= slot_nbytes``; true for the
host arena's slabs). Irregular offsets fall back to one copy per (block, run).

With CUDA KV tensors the ops run on the current stream; bytes go through a temporary CPU tensor,
so the returned handle is tracked by an event only for the device-side tail of a scatter.
"""

from __future__ import annotations

import torch

from kvtier.copy.base import (
    CompletedHandle,
    CopyHandle,
    CudaEventHandle,
    PageCopier,
    handle_size,
)
from kvtier.copy.layout import (
    CopyRequest,
    Direction,
    PagedKV,
    PageRun,
    SlotRows,
    slot_rows,
)


class TorchPageCopier(PageCopier):
    """Copies pages with ``index_select`` / ``index_copy_`` on byte views of the KV allocation.

    ``device`` is informational (the KV tensors' device decides where ops run).
    """

    name = "torch"

    def __init__(self, device: torch.device | str | int | None = None) -> None:
        self.device = torch.device("cpu") if device is None else torch.device(device)

    def _copy(self, kv: PagedKV, request: CopyRequest) -> CopyHandle:
        ids = request.block_ids.to(kv.device)
        rows = slot_rows(request, kv.slot_nbytes)
        for run in kv.runs:
            if rows is None or (kv.device.type == "cpu" and not rows.consecutive):
                # On the CPU a copy per block beats index_select + index_copy_ (which copies twice):
                # measured 3x faster for 1 MiB blocks scattered over an arena.
                _copy_run_per_block(run, request)
            elif request.direction is Direction.GATHER:
                _gather_run(run, ids, rows, request.host.device)
            else:
                _scatter_run(run, ids, rows)
        nbytes, num_pages = handle_size(kv, request)
        if kv.device.type == "cuda" and request.direction is Direction.SCATTER:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(kv.device))
            return CudaEventHandle(event, nbytes, num_pages, (request, kv))
        return CompletedHandle(nbytes, num_pages)


def _gather_run(run: PageRun, ids: torch.Tensor, slots: SlotRows, host_device: torch.device) -> None:
    pages = run.rows()
    dst = slots.rows.narrow(1, run.slot_offset, run.nbytes)
    if slots.consecutive:
        dst = dst.narrow(0, 0, ids.numel())
        if pages.device.type == "cpu" and host_device.type == "cpu":
            torch.index_select(pages, 0, ids, out=dst)  # straight into the arena, no temporary
        else:
            dst.copy_(pages.index_select(0, ids))
        return
    data = pages.index_select(0, ids)
    if data.device != host_device:
        data = data.to(host_device)
    dst.index_copy_(0, slots.index.to(host_device), data)


def _scatter_run(run: PageRun, ids: torch.Tensor, slots: SlotRows) -> None:
    pages = run.rows()
    src = slots.rows.narrow(1, run.slot_offset, run.nbytes)
    if slots.consecutive:
        data = src.narrow(0, 0, ids.numel())
    else:
        data = src.index_select(0, slots.index.to(src.device))
    pages.index_copy_(0, ids, data.to(pages.device))


def _copy_run_per_block(run: PageRun, request: CopyRequest) -> None:
    pages = run.rows()
    host = request.host
    for block, offset in zip(request.block_ids.tolist(), request.offsets.tolist(), strict=True):
        slot = host.narrow(0, offset + run.slot_offset, run.nbytes)
        if request.direction is Direction.GATHER:
            slot.copy_(pages[block])
        else:
            pages[block].copy_(slot)
