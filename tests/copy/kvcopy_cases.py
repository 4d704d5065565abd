"""Shared cases, reference copies and checks for the page-copy tests (no pytest import here).

Used by ``test_copy_torch.py`` (CPU) and ``test_copy_cuda.py`` (GPU; also runnable as a script
when pytest is missing). Every check compares whole allocations byte for byte against a reference
that copies one page at a time straight from the layer tensors, so a stray write anywhere (outside
a slot, into padding, into another block) fails too.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kvtier.copy.base import CompletedHandle, CopyHandle, PageCopier
from kvtier.copy.layout import CopyRequest, PagedKV, choose_chunk_bytes, plan_segments
from kvtier.errors import CopyError

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["float8_e4m3fn"] = torch.float8_e4m3fn


@dataclass(frozen=True)
class Case:
    """One paged-KV layout and request shape."""

    name: str
    layout: str  # layer_outer | block_outer | kv_split | kv_split_block_outer | padded | flat_views
    layers: int
    blocks: int
    page: tuple[int, ...]  # page shape (inner dims of a layer tensor)
    dtype: str
    batch: int
    offsets: str  # packed | pitched | misaligned | irregular | runs (runs of consecutive ids on changing pitches)
    as_list: bool = False  # pass the layers as a list instead of a dict
    dup_ids: bool = False  # gather the same block twice (gather-only cases)

    @property
    def page_bytes(self) -> int:
        n = 1
        for d in self.page:
            n *= d
        return n * torch.empty(0, dtype=DTYPES[self.dtype]).element_size()


_FP8 = "float8_e4m3fn" if "float8_e4m3fn" in DTYPES else "int8"

CASES: list[Case] = [
    Case("one_page", "layer_outer", 1, 4, (16,), "float16", 1, "packed"),
    Case("fp16_layer_outer", "layer_outer", 3, 16, (4, 8, 16), "float16", 5, "pitched"),
    Case("bf16_block_outer", "block_outer", 4, 12, (2, 16, 8), "bfloat16", 7, "packed"),
    Case("fp8_kv_split", "kv_split", 2, 10, (4, 2, 16), _FP8, 4, "misaligned"),
    Case("int8_kv_split_block_outer", "kv_split_block_outer", 3, 8, (8, 2, 8), "int8", 8, "irregular"),
    Case("vllm_int8_views_fp8", "flat_views", 3, 9, (2, 4, 24), _FP8, 6, "pitched"),
    Case("runs_layer_outer", "layer_outer", 3, 40, (4, 8, 16), "float16", 20, "runs"),
    Case("runs_kv_split_block_outer", "kv_split_block_outer", 2, 40, (8, 2, 8), "int8", 24, "runs"),
    Case("thousands_small_pages", "layer_outer", 4, 1100, (32,), "float16", 1024, "packed"),
    Case("large_pages_bf16", "layer_outer", 2, 3, (2, 1024, 300), "bfloat16", 2, "misaligned"),
    Case("large_odd_page_int8", "block_outer", 1, 3, (1048577,), "int8", 2, "misaligned"),
    Case("padded_stride", "padded", 2, 9, (40,), "float16", 4, "pitched"),
    Case("odd_bytes_block_outer", "block_outer", 3, 7, (3, 5), "int8", 6, "misaligned"),
    Case(
        "list_input_dup_ids",
        "layer_outer",
        2,
        6,
        (8, 8),
        "bfloat16",
        4,
        "pitched",
        as_list=True,
        dup_ids=True,
    ),
]
CASE_IDS = [c.name for c in CASES]

LAYOUTS = ("layer_outer", "block_outer", "kv_split", "kv_split_block_outer", "padded", "flat_views")
OFFSET_MODES = ("packed", "pitched", "misaligned", "irregular")


def random_cases(seed: int, count: int) -> list[Case]:
    """``count`` small random layouts (seeded): any layout, dtype, page shape, batch and offsets.

    K/V-split pages are 3-D (so the layers are 5-D and detected as split) and other pages at most
    3-D (so a layer is never mistaken for the split form); padded pages are 1-D.
    """
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        layout = rng.choice(LAYOUTS)
        if layout.startswith("kv_split"):
            page = tuple(rng.randint(1, 6) for _ in range(3))
        elif layout == "padded":
            page = (rng.randint(1, 40),)
        else:
            page = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 3)))
        blocks = rng.randint(3, 24)
        cases.append(
            Case(
                f"random{seed}_{i}_{layout}",
                layout,
                rng.randint(1, 4),
                blocks,
                page,
                rng.choice(sorted(DTYPES)),
                rng.randint(1, blocks),
                rng.choice(OFFSET_MODES),
                as_list=rng.random() < 0.3,
            )
        )
    return cases


@dataclass
class KVSet:
    """A paged KV cache over one allocation: ``raw`` is its bytes, ``kv`` the layer tensors."""

    raw: torch.Tensor  # 1-D uint8, the whole allocation
    kv: dict[str, torch.Tensor] | list[torch.Tensor]
    kv_split: bool


def build_kv(case: Case, raw: torch.Tensor) -> KVSet:
    """Layer tensors of ``case``'s layout as views of ``raw`` (uint8, from :func:`alloc_bytes`)."""
    dt = DTYPES[case.dtype]
    L, N, P = case.layers, case.blocks, case.page
    pad = 12 if case.layout == "padded" else 0
    typed = raw.view(dt)
    layers: list[torch.Tensor]
    if case.layout == "layer_outer":
        a = typed.view(L, N, *P)
        layers = [a[i] for i in range(L)]
    elif case.layout == "flat_views":  # like vLLM: one int8 buffer, each layer a typed view of a slice
        per_layer = N * case.page_bytes
        flat = raw.view(torch.int8)
        layers = [flat[i * per_layer : (i + 1) * per_layer].view(dt).view(N, *P) for i in range(L)]
    elif case.layout == "block_outer":
        a = typed.view(N, L, *P)
        layers = [a[:, i] for i in range(L)]
    elif case.layout == "kv_split":
        a = typed.view(L, 2, N, *P)
        layers = [a[i] for i in range(L)]
    elif case.layout == "kv_split_block_outer":
        a = typed.view(N, L, 2, *P)
        layers = [a[:, i].transpose(0, 1) for i in range(L)]
    elif case.layout == "padded":
        a = typed.view(L, N, P[0] + pad)
        layers = [a[i, :, : P[0]] for i in range(L)]
    else:
        raise ValueError(case.layout)
    split = case.layout.startswith("kv_split")
    kv: dict[str, torch.Tensor] | list[torch.Tensor]
    kv = layers if case.as_list else {f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(layers)}
    return KVSet(raw, kv, split)


def alloc_bytes(case: Case, seed: int) -> torch.Tensor:
    """Random bytes for ``case``'s whole KV allocation (CPU)."""
    pad = 12 if case.layout == "padded" else 0
    parts = 2 if case.layout.startswith("kv_split") else 1
    esize = torch.empty(0, dtype=DTYPES[case.dtype]).element_size()
    per_block = (case.page_bytes + pad * esize) * parts
    return random_bytes(case.layers * case.blocks * per_block, seed)


def random_bytes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def layer_pages(t: torch.Tensor, block: int, split: bool) -> list[torch.Tensor]:
    return [t[0][block], t[1][block]] if split else [t[block]]


def page_as_bytes(page: torch.Tensor) -> torch.Tensor:
    assert page.is_contiguous()
    return page.reshape(-1).view(torch.uint8)


def layer_list(s: KVSet) -> list[torch.Tensor]:
    return list(s.kv.values()) if isinstance(s.kv, dict) else list(s.kv)


def slot_bytes(s: KVSet) -> int:
    return sum(page_as_bytes(p).numel() for t in layer_list(s) for p in layer_pages(t, 0, s.kv_split))


def reference_gather(s: KVSet, ids: list[int], arena: torch.Tensor, offsets: list[int]) -> None:
    """One page at a time, in slot order."""
    for b, off in zip(ids, offsets, strict=True):
        pos = off
        for t in layer_list(s):
            for p in layer_pages(t, b, s.kv_split):
                data = page_as_bytes(p)
                arena[pos : pos + data.numel()].copy_(data)
                pos += data.numel()


def reference_scatter(s: KVSet, ids: list[int], arena: torch.Tensor, offsets: list[int]) -> None:
    for b, off in zip(ids, offsets, strict=True):
        pos = off
        for t in layer_list(s):
            for p in layer_pages(t, b, s.kv_split):
                n = page_as_bytes(p).numel()
                page_as_bytes(p).copy_(arena[pos : pos + n])
                pos += n


def make_request_args(case: Case, slot: int, seed: int) -> tuple[list[int], list[int], int]:
    """``(block_ids, offsets, arena_nbytes)`` for ``case``."""
    rng = random.Random(seed)
    if case.offsets == "runs":
        return _runs(case, slot, rng)
    ids = rng.sample(range(case.blocks), case.batch)
    if case.dup_ids and case.batch > 1:
        ids[-1] = ids[0]
    order = list(range(case.batch))
    if case.offsets == "packed":
        offsets = [k * slot for k in order]
    elif case.offsets == "pitched":
        rng.shuffle(order)
        pitch = (slot + 4095) // 4096 * 4096
        offsets = [4096 + k * pitch for k in order]
    elif case.offsets == "misaligned":
        rng.shuffle(order)
        offsets = [3 + k * (slot + 5) for k in order]
    elif case.offsets == "irregular":
        offsets, pos = [], 1
        for _ in order:
            pos += rng.randrange(0, 37)
            offsets.append(pos)
            pos += slot
        rng.shuffle(offsets)
    else:
        raise ValueError(case.offsets)
    return ids, offsets, max(offsets) + slot + 64


def _runs(case: Case, slot: int, rng: random.Random) -> tuple[list[int], list[int], int]:
    """Runs of consecutive block ids (what a fresh engine allocates), each run's slots on its own
    pitch (packed, padded, doubled) and the next run starting anywhere after: spans to merge and
    boundaries not to merge across."""
    starts = list(range(0, case.blocks, 6))
    rng.shuffle(starts)
    ids: list[int] = []
    offsets: list[int] = []
    pos = 0
    for start in starts:
        length = min(rng.randrange(1, 6), case.batch - len(ids), case.blocks - start)
        pitch = rng.choice([slot, slot + 8, 2 * slot])
        pos += rng.randrange(0, 3) * slot + rng.randrange(0, 5)
        ids += range(start, start + length)
        offsets += [pos + k * pitch for k in range(length)]
        pos += length * pitch
        if len(ids) == case.batch:
            break
    return ids, offsets, pos + slot + 64


class ReplayCopier(PageCopier):
    """Executes the kernel's segment plan on the CPU with memmove: checks the planner without a GPU.

    ``chunk_bytes=None`` uses the kernel's chunk choice.
    """

    name = "replay"

    def __init__(self, chunk_bytes: int | None = None) -> None:
        self.chunk_bytes = chunk_bytes
        self.last_segments: torch.Tensor | None = None

    def _copy(self, kv: PagedKV, request: CopyRequest) -> CopyHandle:
        assert kv.device.type == "cpu" and request.host.device.type == "cpu"
        total = request.num_blocks * kv.slot_nbytes
        chunk = self.chunk_bytes or choose_chunk_bytes(total)
        segs = plan_segments(kv, request, request.host.data_ptr(), chunk_bytes=chunk)
        self.last_segments = segs
        for src, dst, n in segs.tolist():
            ctypes.memmove(dst, src, n)
        return CompletedHandle(total, request.num_blocks * len(kv.pages))


# ---- checks shared by the CPU and GPU suites ---------------------------------------------------


def _to(s: KVSet, case: Case, device: torch.device) -> KVSet:
    return build_kv(case, s.raw.to(device)) if device.type != "cpu" else s


HostFactory = Callable[[int], torch.Tensor]


@contextlib.contextmanager
def arena_for(copier: PageCopier, nbytes: int, host_factory: HostFactory | None) -> Iterator[torch.Tensor]:
    """A host buffer of ``nbytes``; a kernel copier's CUDA registration of it is dropped on exit,
    before the buffer can be freed (even when the check fails)."""
    arena = host_factory(nbytes) if host_factory else torch.empty(nbytes, dtype=torch.uint8)
    try:
        yield arena
    finally:
        unregister = getattr(copier, "unregister_host", None)
        if unregister is not None:
            unregister(arena)


def _unique_ids(case: Case) -> Case:
    return Case(**{**case.__dict__, "dup_ids": False}) if case.dup_ids else case


def check_gather(
    copier: PageCopier, case: Case, device: torch.device, host_factory: HostFactory | None = None
) -> None:
    """gather() writes exactly the reference bytes into the arena, and nothing else."""
    cpu = build_kv(case, alloc_bytes(case, 1))
    slot = slot_bytes(cpu)
    ids, offsets, arena_n = make_request_args(case, slot, 2)
    arena0 = random_bytes(arena_n, 3)
    expected = arena0.clone()
    reference_gather(cpu, ids, expected, offsets)
    dev = _to(cpu, case, device)
    with arena_for(copier, arena_n, host_factory) as arena:
        arena.copy_(arena0)
        handle = copier.gather(dev.kv, ids, arena, offsets)
        handle.wait()
        assert handle.done()
        assert handle.nbytes == slot * len(ids)
        _assert_equal_bytes(arena.cpu(), expected, "arena after gather")
    _assert_equal_bytes(dev.raw.cpu(), cpu.raw, "KV cache after gather (must be unchanged)")


def check_scatter(
    copier: PageCopier, case: Case, device: torch.device, host_factory: HostFactory | None = None
) -> None:
    """scatter() writes exactly the slots into the listed blocks, and nothing else."""
    case = _unique_ids(case)
    cpu = build_kv(case, alloc_bytes(case, 4))
    slot = slot_bytes(cpu)
    ids, offsets, arena_n = make_request_args(case, slot, 5)
    arena0 = random_bytes(arena_n, 6)
    expected = build_kv(case, cpu.raw.clone())
    reference_scatter(expected, ids, arena0, offsets)
    dev = _to(build_kv(case, cpu.raw.clone()), case, device)
    with arena_for(copier, arena_n, host_factory) as arena:
        arena.copy_(arena0)
        handle = copier.scatter(dev.kv, ids, arena, offsets)
        handle.wait()
        assert handle.done()
        _assert_equal_bytes(arena.cpu(), arena0, "arena after scatter (must be unchanged)")
    _assert_equal_bytes(dev.raw.cpu(), expected.raw, "KV cache after scatter")


def check_round_trip(
    copier: PageCopier, case: Case, device: torch.device, host_factory: HostFactory | None = None
) -> None:
    """gather, wipe the blocks, scatter back: the KV cache is restored bit for bit."""
    case = _unique_ids(case)
    cpu = build_kv(case, alloc_bytes(case, 7))
    slot = slot_bytes(cpu)
    ids, offsets, arena_n = make_request_args(case, slot, 8)
    dev = _to(build_kv(case, cpu.raw.clone()), case, device)
    with arena_for(copier, arena_n, host_factory) as arena:
        arena.zero_()
        copier.gather(dev.kv, ids, arena, offsets).wait()
        for t in layer_list(dev):
            for b in ids:
                for p in layer_pages(t, b, dev.kv_split):
                    p.zero_()
        assert not torch.equal(dev.raw.cpu(), cpu.raw)
        copier.scatter(dev.kv, ids, arena, offsets).wait()
    _assert_equal_bytes(dev.raw.cpu(), cpu.raw, "KV cache after gather -> wipe -> scatter")


def _assert_equal_bytes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if torch.equal(got, want):
        return
    diff = (got != want).nonzero()
    at = int(diff[0])
    raise AssertionError(
        f"{what}: {diff.numel()} bytes differ, first at byte {at}: got {int(got[at])}, want {int(want[at])}"
    )


def bad_inputs(device: torch.device) -> Iterator[tuple[str, Callable[[PageCopier], object]]]:
    """``(name, call)`` pairs; each call must raise CopyError and change nothing."""
    case = CASES[1]
    s = build_kv(case, alloc_bytes(case, 9).to(device))
    slot = slot_bytes(s)
    arena = torch.zeros(4 * slot, dtype=torch.uint8)
    kv = s.kv
    first = next(iter(kv.values())) if isinstance(kv, dict) else kv[0]
    yield "block id too large", lambda c: c.gather(kv, [case.blocks], arena, [0])
    yield "negative block id", lambda c: c.gather(kv, [-1], arena, [0])
    yield "float block ids", lambda c: c.gather(kv, torch.tensor([1.0]), arena, [0])
    yield "float offsets in a list", lambda c: c.gather(kv, [0], arena, [1.5])  # type: ignore[list-item]
    yield "nested block ids", lambda c: c.gather(kv, [[0]], arena, [0])  # type: ignore[list-item]
    yield "ids/offsets length mismatch", lambda c: c.gather(kv, [0, 1], arena, [0])
    yield "slot past the end", lambda c: c.gather(kv, [0], arena, [3 * slot + 1])
    yield "negative offset", lambda c: c.scatter(kv, [0], arena, [-1])
    yield "arena not uint8", lambda c: c.gather(kv, [0], torch.zeros(4 * slot, dtype=torch.float32), [0])
    yield "arena 2-D", lambda c: c.gather(kv, [0], arena.view(4, slot), [0])
    yield (
        "arena not contiguous",
        lambda c: c.gather(kv, [0], torch.zeros(8 * slot, dtype=torch.uint8)[::2], [0]),
    )
    yield "arena not a tensor", lambda c: c.gather(kv, [0], bytearray(4 * slot), [0])  # type: ignore[arg-type]
    yield "overlapping slots", lambda c: c.gather(kv, [0, 1], arena, [0, slot - 1])
    yield "duplicate ids in scatter", lambda c: c.scatter(kv, [2, 2], arena, [0, slot])
    yield "page not one run", lambda c: c.gather({"x": first[..., ::2]}, [0], arena, [0])  # a permuted page is fine
    yield "block counts differ", lambda c: c.gather([first, first[:-1]], [0], arena, [0])
    yield "no layers", lambda c: c.gather({}, [0], arena, [0])
    yield "layer not a tensor", lambda c: c.gather({"x": [1, 2]}, [0], arena, [0])  # type: ignore[dict-item]
    overlapping = torch.zeros(1, 64, dtype=torch.int8, device=device).expand(4, 64)
    yield "pages overlap (stride 0)", lambda c: c.gather([overlapping], [0], arena, [0])


@contextlib.contextmanager
def raises(exc_type: type[BaseException], what: str) -> Iterator[None]:
    """Minimal ``pytest.raises`` for script mode."""
    try:
        yield
    except exc_type:
        return
    raise AssertionError(f"{what}: expected {exc_type.__name__}")


def check_bad_inputs(copier: PageCopier, device: torch.device) -> None:
    for name, call in bad_inputs(device):
        with raises(CopyError, name):
            call(copier)
