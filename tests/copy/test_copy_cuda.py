"""GPU tests of the page-copy path: the CUDA kernel backend (and the torch backend on CUDA tensors)
against the one-page-at-a-time reference, plus stream ordering, non-blocking completion,
host-memory registration and the memcpy baselines.

Run with ``pytest tests/copy -m gpu``; every test is skipped without a CUDA device. Where pytest is
not installed, ``python tests/copy/test_copy_cuda.py`` runs the same tests (exit status 1 on a
failure). The kernel library is taken from ``$KVTIER_COPY_LIB`` / the build cache, or built on the
spot with nvcc for this GPU.
"""

from __future__ import annotations

import itertools
import mmap
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import kvcopy_cases as kc  # noqa: E402

from kvtier.copy import TorchPageCopier  # noqa: E402
from kvtier.errors import CopyError  # noqa: E402

try:
    import pytest
except ImportError:  # script mode, see the module docstring
    pytest = None  # type: ignore[assignment]

HAS_GPU = torch.cuda.is_available()
if pytest is not None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]

GPU_CASES = kc.CASES + kc.random_cases(seed=20261121, count=24) + [
    kc.Case("llama_like_4096_pages_32k", "layer_outer", 32, 160, (8, 16, 128), "float16", 128, "pitched"),
    kc.Case("block_outer_4096_pages_16k", "block_outer", 32, 140, (16, 16, 32), "bfloat16", 128, "packed"),
]
GPU_CASE_IDS = [c.name for c in GPU_CASES]


def param(
    name: str, values: list[Any], ids: list[str] | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``pytest.mark.parametrize`` when pytest is present; recorded for the script runner otherwise."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        if pytest is not None:
            return pytest.mark.parametrize(name, values, ids=ids)(fn)
        fn.__dict__.setdefault("kv_params", []).insert(0, (name, values, ids))
        return fn

    return deco


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


_COPIER: Any = None


def kernel_copier() -> Any:
    """One kernel copier for the session; builds the library for this GPU if none is found."""
    global _COPIER
    if _COPIER is None:
        from kvtier.copy._lib import default_library_path
        from kvtier.copy.build import build
        from kvtier.copy.cuda_backend import CudaKernelPageCopier

        path = default_library_path()
        if not path.is_file():
            major, minor = torch.cuda.get_device_capability()
            path = build(
                ["sm_80", "sm_90", f"sm_{major}{minor}"],
                os.path.join(tempfile.mkdtemp(), "libkvtier_copy.so"),
            )
        _COPIER = CudaKernelPageCopier(_device(), lib_path=path)
    return _COPIER


def _pageable(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


def _pinned(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8, pin_memory=True)


_MAPS: list[mmap.mmap] = []


def _shm_mmap(n: int) -> torch.Tensor:
    """Like the host arena: a MAP_SHARED file mapping (in /dev/shm when there is one)."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(dir=folder) as f:
        f.truncate(n)
        m = mmap.mmap(f.fileno(), n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    _MAPS.append(m)  # kept open: tensors from frombuffer must not outlive their map
    return torch.frombuffer(m, dtype=torch.uint8)


def _on_device(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8, device=_device())


HOSTS = {"pageable": _pageable, "pinned": _pinned, "shm_mmap": _shm_mmap, "device": _on_device}


# ---- correctness against the reference -----------------------------------------------------------


@param("case", GPU_CASES, GPU_CASE_IDS)
def test_kernel_gather(case: kc.Case) -> None:
    kc.check_gather(kernel_copier(), case, _device())


@param("case", GPU_CASES, GPU_CASE_IDS)
def test_kernel_scatter(case: kc.Case) -> None:
    kc.check_scatter(kernel_copier(), case, _device())


@param("case", GPU_CASES, GPU_CASE_IDS)
def test_kernel_round_trip(case: kc.Case) -> None:
    kc.check_round_trip(kernel_copier(), case, _device())


@param(
    "case", [kc.CASES[1], kc.CASES[3], kc.CASES[7]], ["fp16_layer_outer", "fp8_kv_split", "large_pages_bf16"]
)
@param("host", list(HOSTS))
def test_kernel_host_kinds(host: str, case: kc.Case) -> None:
    kc.check_gather(kernel_copier(), case, _device(), HOSTS[host])
    kc.check_scatter(kernel_copier(), case, _device(), HOSTS[host])


@param("case", GPU_CASES, GPU_CASE_IDS)
def test_torch_backend_on_cuda(case: kc.Case) -> None:
    kc.check_gather(TorchPageCopier(_device()), case, _device())
    kc.check_scatter(TorchPageCopier(_device()), case, _device())


def test_kernel_bad_inputs() -> None:
    kc.check_bad_inputs(kernel_copier(), _device())
    case = kc.CASES[1]
    cpu_kv = kc.build_kv(case, kc.alloc_bytes(case, 1))
    arena = torch.zeros(1 << 20, dtype=torch.uint8)
    try:
        kernel_copier().gather(cpu_kv.kv, [0], arena, [0])
    except CopyError:
        pass
    else:
        raise AssertionError("a CPU KV cache must be refused by the CUDA copier")
    layers = list(cpu_kv.kv.values())
    try:
        kernel_copier().gather([layers[0].to(_device()), layers[1]], [0], arena, [0])
    except CopyError:
        pass
    else:
        raise AssertionError("layers on different devices must be refused")


# ---- asynchrony and ordering ---------------------------------------------------------------------


def test_done_never_blocks_and_wait_completes() -> None:
    dev = _device()
    kv = [torch.randint(0, 255, (256, 1 << 20), dtype=torch.uint8, device=dev) for _ in range(2)]  # 512 MiB
    arena = _pinned(2 * 256 << 20)
    copier = kernel_copier()
    ids = list(range(256))
    offsets = [i * (2 << 20) for i in ids]
    copier.gather(kv, ids, arena, offsets).wait()  # warm the caching allocators: no cudaMalloc below
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(200_000_000)  # keep the current stream busy, so the copy cannot be done yet
    handle = copier.gather(kv, ids, arena, offsets)
    t0 = time.perf_counter()
    first = handle.done()
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.005, f"done() took {elapsed * 1e3:.2f} ms"
    if hasattr(torch.cuda, "_sleep"):
        assert not first, "the copy cannot have finished while the stream it waits for sleeps"
    handle.wait()
    assert handle.done()
    got = arena.view(256, 2, 1 << 20)
    assert torch.equal(got[:, 0], kv[0].cpu()) and torch.equal(got[:, 1], kv[1].cpu())
    copier.unregister_host(arena)


def test_gather_sees_writes_queued_on_current_stream() -> None:
    dev = _device()
    layer = torch.zeros(8, 4096, dtype=torch.float16, device=dev)
    arena = _pinned(8 * 4096 * 2)
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(50_000_000)
    layer.fill_(3.0)  # queued behind the sleep on the current stream
    kernel_copier().gather([layer], list(range(8)), arena, [i * 8192 for i in range(8)]).wait()
    assert torch.equal(arena.view(torch.float16), torch.full((8 * 4096,), 3.0, dtype=torch.float16))
    kernel_copier().unregister_host(arena)


def test_loads_run_on_their_own_stream_and_never_queue_behind_saves() -> None:
    """A scatter (load) runs on the load stream: with the save stream held up by a long gather, a
    load submitted after it still completes first; and the forward pass reads it once its
    stream waits for the load's event."""
    from kvtier.copy.cuda_backend import CudaKernelPageCopier

    dev = _device()
    copier = CudaKernelPageCopier(dev, lib_path=kernel_copier().library.path)
    assert copier.load_stream != copier.stream
    big = [torch.randint(0, 255, (256, 1 << 20), dtype=torch.uint8, device=dev) for _ in range(2)]  # 512 MiB of saves
    save_arena = _pinned(2 * 256 << 20)
    copier.gather(big, list(range(256)), save_arena, [i * (2 << 20) for i in range(256)]).wait()  # warm up
    small = [torch.zeros(4, 4096, dtype=torch.uint8, device=dev) for _ in range(2)]
    load_arena = _pinned(4 * 8192)
    load_arena.fill_(7)
    saving = copier.gather(big, list(range(256)), save_arena, [i * (2 << 20) for i in range(256)])
    loading = copier.scatter(small, list(range(4)), load_arena, [i * 8192 for i in range(4)])
    loading.wait()
    assert not saving.done(), "the load waited for the save: they share a stream"
    torch.cuda.current_stream(dev).wait_event(loading.event)
    assert all(bool((layer == 7).all()) for layer in small)
    saving.wait()
    copier.close()
    try:
        CudaKernelPageCopier(dev, lib_path=kernel_copier().library.path, stream=copier.stream, load_stream=copier.stream)
    except CopyError:
        pass
    else:
        raise AssertionError("one stream for loads and saves must be refused")


def test_host_registered_once_and_released() -> None:
    from kvtier.copy.cuda_backend import CudaKernelPageCopier

    copier = CudaKernelPageCopier(_device(), lib_path=kernel_copier().library.path)
    case = kc.CASES[1]
    s = kc.build_kv(case, kc.alloc_bytes(case, 1).to(_device()))
    arena = _shm_mmap(1 << 20)
    slot = kc.slot_bytes(s)
    copier.gather(s.kv, [0], arena, [0]).wait()
    copier.gather(s.kv, [1], arena[slot:], [0]).wait()  # a view of the same allocation
    assert len(copier._hosts) == 1
    copier.close()
    assert not copier._hosts
    try:
        copier.gather(s.kv, [0], arena, [0])
    except CopyError:
        pass
    else:
        raise AssertionError("a closed copier must refuse work")


# ---- the benchmark's baselines ----------------------------------------------------------------------


@param("batched", [False, True], ["memcpy_loop", "memcpy_batch"])
def test_memcpy_baselines(batched: bool) -> None:
    dev = _device()
    copier = kernel_copier()
    lib = copier.library
    src = torch.randint(0, 255, (64, 5000), dtype=torch.uint8, device=dev)
    host = _pinned(64 * 5000)
    order = torch.randperm(64)
    dsts = torch.tensor([host.data_ptr() + 5000 * i for i in range(64)], dtype=torch.int64)
    srcs = torch.tensor([src[int(order[i])].data_ptr() for i in range(64)], dtype=torch.int64)
    sizes = torch.full((64,), 5000, dtype=torch.int64)
    stream = torch.cuda.Stream(device=dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    lib.memcpy_ranges(
        dsts.data_ptr(), srcs.data_ptr(), sizes.data_ptr(), 64, dev.index, stream.cuda_stream, batched=batched
    )
    stream.synchronize()
    assert torch.equal(host.view(64, 5000), src[order].cpu())


# ---- script mode ------------------------------------------------------------------------------------


def _run_as_script() -> int:
    if not HAS_GPU:
        print("no CUDA device: GPU tests skipped")
        return 0
    passed = failed = 0
    for name, fn in list(globals().items()):
        if not name.startswith("test_") or not callable(fn):
            continue
        axes = [
            [(pname, v, ids[i] if ids else v if isinstance(v, str) else str(i)) for i, v in enumerate(values)]
            for pname, values, ids in getattr(fn, "kv_params", [])
        ]
        for combo in itertools.product(*axes):
            label = name + ("[" + "-".join(i for _, _, i in combo) + "]" if combo else "")
            try:
                fn(**{p: v for p, v, _ in combo})
            except Exception:  # noqa: BLE001 - report every failure, keep going
                failed += 1
                traceback.print_exc()
                print(f"FAIL {label}")
            else:
                passed += 1
                print(f"PASS {label}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_run_as_script())
