"""CPU tests of the page-copy path: the torch backend, and the kernel's segment plan replayed on
the CPU (``ReplayCopier``), against a one-page-at-a-time reference."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kvcopy_cases as kc  # noqa: E402

from kvtier.copy import TorchPageCopier, describe_paged_kv, make_page_copier  # noqa: E402
from kvtier.copy.layout import (  # noqa: E402
    Direction,
    choose_chunk_bytes,
    make_request,
    plan_segments,
    slot_rows,
)
from kvtier.errors import CopyError, KernelUnavailableError  # noqa: E402

CPU = torch.device("cpu")
BACKENDS = {
    "torch": lambda: TorchPageCopier(),
    "replay": lambda: kc.ReplayCopier(),  # the kernel's plan, default chunking
    "replay_chunk48": lambda: kc.ReplayCopier(chunk_bytes=48),  # cut every page into 48-byte pieces
}


def _skip_slow_replay(backend: str, case: kc.Case) -> None:
    if backend == "replay_chunk48" and case.page_bytes * case.layers * case.batch > (1 << 20):
        pytest.skip("48-byte chunks of MiB pages: covered by the default replay")


@pytest.mark.parametrize("case", kc.CASES, ids=kc.CASE_IDS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gather_matches_reference(backend: str, case: kc.Case) -> None:
    _skip_slow_replay(backend, case)
    kc.check_gather(BACKENDS[backend](), case, CPU)


@pytest.mark.parametrize("case", kc.CASES, ids=kc.CASE_IDS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_scatter_matches_reference(backend: str, case: kc.Case) -> None:
    _skip_slow_replay(backend, case)
    kc.check_scatter(BACKENDS[backend](), case, CPU)


RANDOM_CASES = kc.random_cases(seed=20261121, count=24)


@pytest.mark.parametrize("case", RANDOM_CASES, ids=[c.name for c in RANDOM_CASES])
@pytest.mark.parametrize("backend", ["torch", "replay_chunk48"])
def test_random_layouts_match_reference(backend: str, case: kc.Case) -> None:
    kc.check_gather(BACKENDS[backend](), case, CPU)
    kc.check_scatter(BACKENDS[backend](), case, CPU)
    kc.check_round_trip(BACKENDS[backend](), case, CPU)


def test_scatter_of_consecutive_blocks_from_one_slot() -> None:
    """Consecutive block ids may read the same slot (a scatter may repeat an offset): that is no
    span with a pitch, each block gets the slot's bytes."""
    kv = [torch.zeros(6, 4, 8, dtype=torch.float16) for _ in range(2)]
    arena = torch.arange(256, dtype=torch.uint8).repeat(8)
    TorchPageCopier().scatter(kv, [2, 3, 4], arena, [64, 64, 320]).wait()
    slot_nbytes = 2 * 4 * 8 * 2
    for block, offset in ((2, 64), (3, 64), (4, 320)):
        got = torch.cat([layer[block].contiguous().view(torch.uint8).flatten() for layer in kv])
        assert torch.equal(got, arena[offset:offset + slot_nbytes])


@pytest.mark.parametrize("case", kc.CASES, ids=kc.CASE_IDS)
def test_round_trip_restores_exactly(case: kc.Case) -> None:
    kc.check_round_trip(TorchPageCopier(), case, CPU)


@pytest.mark.parametrize("backend", ["torch", "replay"])
def test_bad_input_raises_copy_error(backend: str) -> None:
    kc.check_bad_inputs(BACKENDS[backend](), CPU)


def test_bad_input_leaves_arena_untouched() -> None:
    case = kc.CASES[1]
    s = kc.build_kv(case, kc.alloc_bytes(case, 1))
    arena = kc.random_bytes(4 * kc.slot_bytes(s), 2)
    before = arena.clone()
    with pytest.raises(CopyError, match="out of range"):
        TorchPageCopier().gather(s.kv, [0, case.blocks], arena, [0, kc.slot_bytes(s)])
    assert torch.equal(arena, before)


def test_empty_request_is_done() -> None:
    case = kc.CASES[0]
    s = kc.build_kv(case, kc.alloc_bytes(case, 1))
    handle = TorchPageCopier().gather(s.kv, [], torch.zeros(0, dtype=torch.uint8), [])
    assert handle.done() and handle.nbytes == 0 and handle.num_pages == 0


def test_described_layout_is_reused_and_tensor_indices_work() -> None:
    case = kc.CASES[2]
    s = kc.build_kv(case, kc.alloc_bytes(case, 1))
    kv = describe_paged_kv(s.kv)
    slot = kv.slot_nbytes
    arena = torch.zeros(3 * slot, dtype=torch.uint8)
    TorchPageCopier().gather(kv, torch.tensor([4, 1, 7]), arena, torch.tensor([2 * slot, 0, slot])).wait()
    expected = torch.zeros_like(arena)
    kc.reference_gather(s, [4, 1, 7], expected, [2 * slot, 0, slot])
    assert torch.equal(arena, expected)


# ---- layout description ------------------------------------------------------------------------


def test_describe_layer_outer() -> None:
    case = kc.CASES[1]
    kv = describe_paged_kv(kc.build_kv(case, kc.alloc_bytes(case, 1)).kv)
    assert not kv.kv_split and kv.num_blocks == case.blocks
    assert kv.slot_nbytes == case.layers * case.page_bytes
    assert [p.slot_offset for p in kv.pages] == [i * case.page_bytes for i in range(case.layers)]
    assert len(kv.runs) == case.layers
    assert kv.layer_names[0] == "model.layers.0.self_attn.attn"


def test_describe_block_outer_merges_a_block_into_one_run() -> None:
    case = kc.CASES[2]
    kv = describe_paged_kv(kc.build_kv(case, kc.alloc_bytes(case, 1)).kv)
    assert len(kv.pages) == case.layers
    assert len(kv.runs) == 1 and kv.runs[0].nbytes == kv.slot_nbytes == kv.runs[0].block_stride


def test_describe_kv_split_orders_k_then_v_per_layer() -> None:
    case = kc.CASES[3]
    kv = describe_paged_kv(kc.build_kv(case, kc.alloc_bytes(case, 1)).kv)
    assert kv.kv_split
    n0, n1 = kv.layer_names[:2]
    assert [(p.layer, p.part) for p in kv.pages][:3] == [(n0, 0), (n0, 1), (n1, 0)]
    assert kv.slot_nbytes == 2 * case.layers * case.page_bytes


def test_describe_kv_split_override() -> None:
    t = torch.zeros(2, 3, 4, 5, 6, dtype=torch.float16)  # 5-D with a leading 2: auto says K/V split
    assert describe_paged_kv([t]).kv_split
    kv = describe_paged_kv([t], kv_split=False)
    assert not kv.kv_split and kv.num_blocks == 2 and kv.slot_nbytes == 3 * 4 * 5 * 6 * 2
    with pytest.raises(CopyError, match="K/V-split"):
        describe_paged_kv([torch.zeros(3, 4)], kv_split=True)


# ---- the segment plan (what the kernel executes) ----------------------------------------------


def _plan(case: kc.Case, direction: Direction, chunk: int | None) -> tuple[torch.Tensor, int]:
    s = kc.build_kv(case, kc.alloc_bytes(case, 1))
    kv = describe_paged_kv(s.kv)
    ids, offsets, n = kc.make_request_args(case, kv.slot_nbytes, 2)
    req = make_request(kv, ids, torch.zeros(n, dtype=torch.uint8), offsets, direction)
    return plan_segments(kv, req, 1 << 40, chunk_bytes=chunk), kv.slot_nbytes * len(ids)


@pytest.mark.parametrize("direction", list(Direction))
def test_plan_cuts_large_pages_and_keeps_alignment(direction: Direction) -> None:
    case = next(c for c in kc.CASES if c.name == "large_pages_bf16")
    whole, total = _plan(case, direction, None)
    chunk = choose_chunk_bytes(total)
    cut, _ = _plan(case, direction, chunk)
    assert whole.shape[0] == case.layers * case.batch
    assert cut.shape[0] > 4 * whole.shape[0]  # a MiB page spreads over many warps
    assert int(cut[:, 2].sum()) == int(whole[:, 2].sum()) == total
    assert int(cut[:, 2].max()) <= chunk
    # every piece keeps its page's src/dst skew mod 16, so vector width does not drop
    skew = lambda t: (t[:, 0] - t[:, 1]) % 16  # noqa: E731
    assert set(skew(cut).tolist()) == set(skew(whole).tolist())


def test_plan_small_pages_is_one_segment_per_page() -> None:
    case = next(c for c in kc.CASES if c.name == "thousands_small_pages")
    segs, total = _plan(
        case, Direction.GATHER, choose_chunk_bytes(case.page_bytes * case.layers * case.batch)
    )
    assert segs.shape == (case.layers * case.batch, 3)


def test_choose_chunk_bytes_bounds() -> None:
    assert choose_chunk_bytes(0) == 4096
    assert choose_chunk_bytes(16 << 10) == 4096
    assert choose_chunk_bytes(8 << 30) == 64 << 10
    assert all(choose_chunk_bytes(n) % 16 == 0 for n in (1, 10**6, 10**9))


def test_plan_rejects_bad_chunk() -> None:
    case = kc.CASES[0]
    with pytest.raises(CopyError, match="multiple of 16"):
        _plan(case, Direction.GATHER, 24)


def test_slot_rows_detects_pitch() -> None:
    case = kc.CASES[1]
    kv = describe_paged_kv(kc.build_kv(case, kc.alloc_bytes(case, 1)).kv)
    host = torch.zeros(1 << 20, dtype=torch.uint8)
    slot = kv.slot_nbytes
    regular = slot_rows(
        make_request(kv, [0, 1, 2], host, [7 + 2 * slot, 7, 7 + slot], Direction.GATHER), slot
    )
    assert regular is not None and not regular.consecutive and regular.index.tolist() == [2, 0, 1]
    consecutive = slot_rows(make_request(kv, [0, 1], host, [100, 100 + slot], Direction.GATHER), slot)
    assert consecutive is not None and consecutive.consecutive
    assert (
        slot_rows(make_request(kv, [0, 1, 2], host, [0, slot + 1, 2 * slot + 3], Direction.GATHER), slot)
        is None
    )


# ---- factory and kernel availability -------------------------------------------------------------


def test_factory_picks_torch_on_cpu() -> None:
    assert isinstance(make_page_copier("cpu"), TorchPageCopier)
    assert isinstance(make_page_copier(), TorchPageCopier)
    assert isinstance(make_page_copier("cpu", backend="torch"), TorchPageCopier)


def test_factory_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(CopyError, match="valid: auto, cuda, torch"):
        make_page_copier("cpu", backend="triton")  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_backend_unavailable_without_gpu() -> None:
    with pytest.raises(KernelUnavailableError):
        make_page_copier("cuda", backend="cuda")
    assert isinstance(make_page_copier("cuda"), TorchPageCopier)  # auto falls back


def test_missing_library_is_kernel_unavailable(tmp_path: os.PathLike[str]) -> None:
    from kvtier.copy._lib import load_library

    with pytest.raises(KernelUnavailableError, match="python -m kvtier.copy.build"):
        load_library(os.path.join(tmp_path, "nope.so"))
    junk = os.path.join(tmp_path, "junk.so")
    with open(junk, "wb") as f:
        f.write(b"not an ELF file")
    with pytest.raises(KernelUnavailableError, match="cannot load"):
        load_library(junk)
