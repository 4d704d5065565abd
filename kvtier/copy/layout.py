"""Paged KV caches as byte runs, validated copy requests, and the segment planner.

Nothing here copies bytes or touches CUDA: it turns vLLM's per-layer KV tensors into a
:class:`PagedKV` once, checks a request (block ids, host arena, byte offsets) against it, and
plans the ``(src, dst, nbytes)`` segments that the CUDA kernel executes.

Pages: each layer tensor is ``[num_blocks, ...]`` and ``kv[layer][block]`` is one dense run of
memory (contiguous, or a permutation of it: vLLM's LBNHC order seen as [H, N, C]; the slot holds
the run's bytes in memory order, which the layout id's ``page_layout`` names), with any block stride (layer-outermost layouts, and block-outermost ones where a layer's
block stride spans all layers). The older K/V-split form ``[2, num_blocks, ...]`` gives two pages
per layer and block: ``kv[layer][0][block]`` (K) then ``kv[layer][1][block]`` (V).

Arena slot format (see ``docs/copy.md``): a block's slot holds its pages in layer order, back to
back, with no header or padding between them::

    slot = page(layer 0) | page(layer 1) | ... | page(layer L-1)              # one page per layer
    slot = K(layer 0) | V(layer 0) | K(layer 1) | V(layer 1) | ...            # K/V-split form

"Layer order" is the iteration order of the mapping or sequence given, frozen in :class:`PagedKV`,
so a slot written by one engine reads back into another only if both list the layers in the same
order. A slot is ``PagedKV.slot_nbytes`` bytes and may start at any byte offset of the arena;
16-byte aligned offsets let the kernel use 16-byte vector accesses.

Runs: pages that are adjacent both in GPU memory and in the slot (every layer of a block in a
block-outermost layout) are merged into one :class:`PageRun`, so such a block is copied as one
piece.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from kvtier.errors import CopyError

#: What vLLM hands to ``register_kv_caches``: layer name -> tensor, or tensors in layer order.
KVCaches = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
#: Block ids or byte offsets: a list of ints, a range, or a 1-D integer tensor.
IndexLike = Sequence[int] | torch.Tensor

#: Bounds for the kernel's per-warp chunk; pages larger than the chunk are cut into chunks.
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 64 << 10
#: Aim for about this many segments per launch so that small batches still occupy every SM.
TARGET_SEGMENTS = 4096


class Direction(str, Enum):
    """Which way bytes move. ``GATHER``: paged KV -> host slots; ``SCATTER``: host slots -> paged KV."""

    GATHER = "gather"
    SCATTER = "scatter"


@dataclass(frozen=True, slots=True)
class PageInfo:
    """One page of a block: ``layer`` (name), ``part`` (0, or 1 for V in the K/V-split form)."""

    layer: str
    part: int
    nbytes: int
    slot_offset: int  # where the page starts inside the block's slot


@dataclass(frozen=True, slots=True)
class PageRun:
    """Bytes of a block that are contiguous in the KV allocation and in the slot.

    Invariant: block ``b``'s run is ``storage[offset + b * block_stride :][:nbytes]`` and goes to
    ``slot[slot_offset : slot_offset + nbytes]``; ``block_stride >= nbytes`` (runs never overlap).
    """

    storage: torch.Tensor  # 1-D uint8 tensor over the whole allocation the run lives in
    offset: int  # byte offset of block 0's run in ``storage``
    block_stride: int  # bytes from one block's run to the next block's
    nbytes: int
    slot_offset: int
    num_blocks: int

    @property
    def address(self) -> int:
        """Address of block 0's run (a device address for CUDA tensors)."""
        return self.storage.data_ptr() + self.offset

    def rows(self) -> torch.Tensor:
        """``[num_blocks, nbytes]`` uint8 view: row ``b`` is block ``b``'s run, in place."""
        return self.storage.as_strided((self.num_blocks, self.nbytes), (self.block_stride, 1), self.offset)


@dataclass(frozen=True, slots=True)
class PagedKV:
    """A paged KV cache described once: its pages, byte runs and slot size.

    Invariants: every layer has ``num_blocks`` blocks; ``slot_nbytes == sum(p.nbytes for p in
    pages)``; pages and runs are in slot order and tile the slot without gaps.
    """

    layer_names: tuple[str, ...]
    kv_split: bool
    num_blocks: int
    slot_nbytes: int
    pages: tuple[PageInfo, ...]
    runs: tuple[PageRun, ...]
    device: torch.device


@dataclass(frozen=True, slots=True)
class CopyRequest:
    """A validated request: block ``block_ids[i]`` <-> ``host[offsets[i] :][:slot_nbytes]``.

    Invariants: ``block_ids`` and ``offsets`` are 1-D int64 CPU tensors of equal length; ids are in
    range; every slot lies inside ``host``; a gather never writes two slots that overlap and a
    scatter never writes one block twice.
    """

    direction: Direction
    block_ids: torch.Tensor
    offsets: torch.Tensor
    host: torch.Tensor  # 1-D contiguous uint8 (the arena), on the CPU or a CUDA device

    @property
    def num_blocks(self) -> int:
        return int(self.block_ids.numel())


def describe_paged_kv(kv_caches: KVCaches | PagedKV, *, kv_split: bool | None = None) -> PagedKV:
    """Describe vLLM's per-layer KV tensors (see the module docstring); raise :class:`CopyError`.

    ``kv_split=None`` detects the K/V-split form: every layer is 5-D with a leading dimension of 2
    (the pre-0.32 ``[2, num_blocks, block_size, heads, head_size]``). Pass ``kv_split=False`` for a
    5-D layout whose first dimension really is ``num_blocks == 2``.
    """
    if isinstance(kv_caches, PagedKV):
        return kv_caches
    if isinstance(kv_caches, Mapping):
        items = [(str(name), t) for name, t in kv_caches.items()]
    elif isinstance(kv_caches, Sequence):
        items = [(f"layer{i}", t) for i, t in enumerate(kv_caches)]
    else:
        raise CopyError(
            "kv_caches must be a dict of layer name -> tensor or a list of tensors, "
            f"got {type(kv_caches).__name__}"
        )
    if not items:
        raise CopyError("no KV cache tensors given: pass the dict vLLM gives register_kv_caches()")
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise CopyError(f"KV cache of layer {name!r} is a {type(t).__name__}, not a torch.Tensor")
    device = items[0][1].device
    if kv_split is None:
        kv_split = all(t.dim() == 5 and t.shape[0] == 2 for _, t in items)

    views: list[tuple[str, int, torch.Tensor]] = []
    for name, t in items:
        if t.device != device:
            raise CopyError(
                f"layer {name!r} is on {t.device} but layer {items[0][0]!r} is on {device}: "
                "all KV tensors must share one device"
            )
        if kv_split:
            if t.dim() < 2 or t.shape[0] != 2:
                raise CopyError(
                    f"layer {name!r} has shape {tuple(t.shape)}; the K/V-split form needs "
                    "[2, num_blocks, ...] (pass kv_split=False otherwise)"
                )
            views += [(name, 0, t[0]), (name, 1, t[1])]
        else:
            if t.dim() < 1:
                raise CopyError(f"layer {name!r} is a 0-d tensor; expected [num_blocks, ...]")
            views.append((name, 0, t))

    num_blocks = int(views[0][2].shape[0])
    storages: dict[int, torch.Tensor] = {}
    pages: list[PageInfo] = []
    runs: list[PageRun] = []
    slot = 0
    for name, part, v in views:
        if int(v.shape[0]) != num_blocks:
            raise CopyError(
                f"layer {name!r} has {v.shape[0]} blocks but layer {views[0][0]!r} has {num_blocks}: "
                "all layers must have the same number of blocks"
            )
        if num_blocks == 0:
            raise CopyError(f"layer {name!r} has no blocks")
        if not _is_dense(v[0]):
            raise CopyError(
                f"layer {name!r}: a block's page is not one dense run of memory (shape {tuple(v.shape)}, "
                f"strides {v.stride()}); kvtier copies whole pages, so kv[layer][block] must fill one run "
                "(vLLM's LBHNC, LBNHC, BLHNC and BLNHC orders do; LHBNC and BHLNC interleave a block's "
                "heads with other blocks or layers)"
            )
        esize = v.element_size()
        nbytes = v[0].numel() * esize
        if nbytes == 0:
            raise CopyError(f"layer {name!r} has empty pages (shape {tuple(v.shape)})")
        stride = v.stride(0) * esize if num_blocks > 1 else nbytes
        if stride < nbytes:
            raise CopyError(
                f"layer {name!r}: block stride {stride} B is smaller than its {nbytes} B page, so pages overlap"
            )
        st = v.untyped_storage()
        storage = storages.get(st.data_ptr())
        if storage is None:
            storage = torch.empty(0, dtype=torch.uint8, device=device).set_(st, 0, (st.nbytes(),), (1,))
            storages[st.data_ptr()] = storage
        offset = v.data_ptr() - st.data_ptr()
        pages.append(PageInfo(name, part, nbytes, slot))
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.storage.data_ptr() == st.data_ptr()
            and last.block_stride == stride
            and last.offset + last.nbytes == offset
            and last.nbytes + nbytes <= stride
        ):
            runs[-1] = PageRun(
                last.storage, last.offset, stride, last.nbytes + nbytes, last.slot_offset, num_blocks
            )
        else:
            runs.append(PageRun(storage, offset, stride, nbytes, slot, num_blocks))
        slot += nbytes
    return PagedKV(
        tuple(dict.fromkeys(n for n, _ in items)),
        bool(kv_split),
        num_blocks,
        slot,
        tuple(pages),
        tuple(runs),
        device,
    )


def _is_dense(page: torch.Tensor) -> bool:
    """Whether ``page``'s elements fill exactly ``numel`` consecutive elements from its first
    (contiguous, or a permutation of a contiguous tensor: LBNHC's [N, H, C] page seen as [H, N, C]).
    Its bytes are then the run at ``data_ptr()``, in memory order."""
    if page.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(page.shape, page.stride()) if size > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _as_index(values: IndexLike, what: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        items = list(values)
        if not items:
            return torch.empty(0, dtype=torch.int64)
        try:
            values = torch.as_tensor(items)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise CopyError(f"{what} must be a sequence of ints: {exc}") from exc
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise CopyError(f"{what} must hold integers, got {values.dtype} values")
    if values.dim() != 1:
        raise CopyError(f"{what} must be 1-D, got shape {tuple(values.shape)}")
    return values.detach().to(device="cpu", dtype=torch.int64)


def make_request(
    kv: PagedKV, block_ids: IndexLike, host: torch.Tensor, offsets: IndexLike, direction: Direction
) -> CopyRequest:
    """Validate a gather/scatter request against ``kv``; raise :class:`CopyError` naming the problem."""
    ids = _as_index(block_ids, "block_ids")
    offs = _as_index(offsets, "offsets")
    if ids.numel() != offs.numel():
        raise CopyError(
            f"got {ids.numel()} block ids but {offs.numel()} offsets: give one arena byte offset per block"
        )
    if not isinstance(host, torch.Tensor):
        raise CopyError(
            "host must be a uint8 torch.Tensor (e.g. torch.frombuffer(arena_mmap, dtype=torch.uint8)), "
            f"got {type(host).__name__}"
        )
    if host.dtype != torch.uint8 or host.dim() != 1 or (host.numel() > 1 and host.stride(0) != 1):
        raise CopyError(
            f"host must be a 1-D contiguous uint8 tensor, got dtype {host.dtype}, "
            f"shape {tuple(host.shape)}, strides {host.stride()}"
        )
    n = int(ids.numel())
    if n:
        bad = ((ids < 0) | (ids >= kv.num_blocks)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise CopyError(
                f"block_ids[{i}] = {int(ids[i])} is out of range: the KV cache has blocks 0..{kv.num_blocks - 1}"
            )
        bad = ((offs < 0) | (offs + kv.slot_nbytes > host.numel())).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise CopyError(
                f"offsets[{i}] = {int(offs[i])}: a {kv.slot_nbytes}-byte slot there does not fit "
                f"in the {host.numel()}-byte host buffer"
            )
        if direction is Direction.GATHER and n > 1:
            sorted_offs, order = torch.sort(offs)
            gaps = sorted_offs[1:] - sorted_offs[:-1]
            bad = (gaps < kv.slot_nbytes).nonzero()
            if bad.numel():
                j = int(bad[0])
                a, b = int(order[j]), int(order[j + 1])
                raise CopyError(
                    f"slots overlap: offsets[{a}] = {int(offs[a])} and offsets[{b}] = {int(offs[b])} "
                    f"are less than one slot ({kv.slot_nbytes} B) apart, so a gather would write "
                    "the same bytes twice"
                )
        if direction is Direction.SCATTER and n > 1:
            uniq, counts = torch.unique(ids, return_counts=True)
            dup = (counts > 1).nonzero()
            if dup.numel():
                raise CopyError(
                    f"block id {int(uniq[int(dup[0])])} appears more than once: "
                    "a scatter must write each block once"
                )
    return CopyRequest(direction, ids, offs, host)


def choose_chunk_bytes(total_bytes: int) -> int:
    """Chunk size for the kernel: a power of two in [MIN_CHUNK_BYTES, MAX_CHUNK_BYTES].

    Small batches get small chunks (more warps busy), large ones 64 KiB chunks (few descriptors).
    Always a multiple of 16, so cutting a page keeps every piece's src/dst alignment class.
    """
    want = max(1, total_bytes // TARGET_SEGMENTS)
    return min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, 1 << (want - 1).bit_length()))


def plan_segments(
    kv: PagedKV, request: CopyRequest, host_address: int, *, chunk_bytes: int | None = None
) -> torch.Tensor:
    """Plan the copy as an ``int64 [N, 3]`` CPU tensor of ``(src, dst, nbytes)`` rows.

    ``host_address`` is the address of ``request.host[0]`` as the copier reaches it (the device
    address of registered host memory for the kernel). Rows are in slot order (block by block,
    runs in slot order); runs longer than ``chunk_bytes`` (a multiple of 16) are cut into
    ``chunk_bytes`` pieces. ``chunk_bytes=None`` means no cutting.
    """
    if chunk_bytes is not None and (chunk_bytes <= 0 or chunk_bytes % 16):
        raise CopyError(f"chunk_bytes must be a positive multiple of 16, got {chunk_bytes}")
    ids, offs = request.block_ids, request.offsets
    base = torch.tensor([r.address for r in kv.runs], dtype=torch.int64)
    stride = torch.tensor([r.block_stride for r in kv.runs], dtype=torch.int64)
    sizes = torch.tensor([r.nbytes for r in kv.runs], dtype=torch.int64)
    slot_off = torch.tensor([r.slot_offset for r in kv.runs], dtype=torch.int64)
    page = base[None, :] + ids[:, None] * stride[None, :]
    slot = host_address + offs[:, None] + slot_off[None, :]
    n = sizes.expand(ids.numel(), -1)
    src, dst = (page, slot) if request.direction is Direction.GATHER else (slot, page)
    segs = torch.stack([src.reshape(-1), dst.reshape(-1), n.reshape(-1)], dim=1)
    if chunk_bytes is None or segs.numel() == 0 or int(sizes.max()) <= chunk_bytes:
        return segs.contiguous()
    pieces = (segs[:, 2] + chunk_bytes - 1) // chunk_bytes
    owner = torch.repeat_interleave(torch.arange(segs.shape[0]), pieces)
    first = torch.cumsum(pieces, 0) - pieces
    skip = (torch.arange(owner.numel()) - first[owner]) * chunk_bytes
    out = segs[owner]
    out[:, 0] += skip
    out[:, 1] += skip
    out[:, 2] = torch.clamp(out[:, 2] - skip, max=chunk_bytes)
    return out


@dataclass(frozen=True, slots=True)
class SlotRows:
    """The request's slots as rows of an ``as_strided`` view of the host buffer.

    Row ``index[i]`` of ``rows`` is block ``i``'s slot. Exists when every offset is
    ``lowest + k * pitch`` with ``pitch >= slot_nbytes`` (fixed-size arena slots).
    ``consecutive`` is true when ``index == arange(n)`` (slots back to back in request order).
    """

    rows: torch.Tensor
    index: torch.Tensor
    consecutive: bool


def slot_rows(request: CopyRequest, slot_nbytes: int) -> SlotRows | None:
    """Return :class:`SlotRows` for ``request``, or None when its offsets are irregular."""
    offs = request.offsets
    low = int(offs.min())
    rel = offs - low
    pitch = math.gcd(*rel.tolist()) or slot_nbytes
    if pitch < slot_nbytes:
        return None
    index = rel // pitch
    host = request.host
    rows = host.as_strided((int(index.max()) + 1, slot_nbytes), (pitch, 1), host.storage_offset() + low)
    return SlotRows(rows, index, torch.equal(index, torch.arange(index.numel())))
