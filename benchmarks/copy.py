"""GB/s of the kvtier page-copy kernel next to copy-engine bounds, GPU -> host and host -> GPU.

    python -m benchmarks.copy [--quick] [--repeat N] [--stat median|best] [--no-write]
    PYTHONPATH=. python benchmarks/copy.py [...]           # the same

For each page size (16 KiB .. 2 MiB) and batch (1 .. 4096 pages, at most ``--max-bytes``) the
batch's pages are random blocks of a paged KV tensor on the GPU and go to (``d2h``, gather) or
come from (``h2d``, scatter) back-to-back slots of a host arena: an anonymous shared mapping
registered with ``cudaHostRegister``, like the real arena. Measured in the same run, on one stream,
with CUDA events (``--repeat`` samples of ~30-50 ms each, reduced by ``--stat``):

- ``kernel``: one ``kvtier_copy_segments`` launch per batch, segment table already on the GPU;
- ``copier``: the whole ``CudaKernelPageCopier.gather/scatter`` call (checks, planning, table
  upload, launch, event), on the host clock, calls back to back;
- ``memcpy_loop`` (a): one ``cudaMemcpyAsync`` per page, issued from C;
- ``memcpy_batch`` (b): one ``cudaMemcpyBatchAsync`` per batch (the loop if it fails);
- ``bound`` (c): one ``cudaMemcpyAsync`` of the batch's total bytes, contiguous: the bus bound.

Rows (``benchmarks/results/copy.json``, see :mod:`benchmarks.common`): per case, metrics
``kernel_GBps_vs_bound`` (target ratio 0.9 for pages >= 64 KiB), ``kernel_GBps_vs_memcpy_loop``
(target 2 for pages <= 32 KiB), ``kernel_GBps_vs_memcpy_batch`` and ``copier_GBps_vs_bound``, with
``gpu``, ``direction``, ``page_bytes``, ``pages``, ``segments`` and ``verified`` (the kernel's
result was checked byte for byte). Exit status 1 if any check failed.

Without a CUDA GPU it prints why and exits 0 without measuring or writing anything.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder would come first on sys.path and `copy.py` would shadow the
# standard library's `copy` module: drop it, and put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import mmap  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Row,
    command_line,
    fmt_size,
    make_parser,
    print_table,
    repeats,
    summarize_targets,
    write_results,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
FULL_PAGES = [16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB]
FULL_BATCHES = [1, 4, 16, 64, 256, 1024, 4096]
QUICK_PAGES = [16 * KiB, 32 * KiB, 64 * KiB, 256 * KiB, 2 * MiB]
QUICK_BATCHES = [1, 64, 1024]
GBPS = "GB/s"

#: (measured, baseline, what the baseline is, target ratio for a page size or None)
COMPARISONS: list[tuple[str, str, str, Callable[[int], float | None]]] = [
    ("kernel", "bound", "one cudaMemcpyAsync of the same bytes", lambda p: 0.9 if p >= 64 * KiB else None),
    ("kernel", "memcpy_loop", "cudaMemcpyAsync per page", lambda p: 2.0 if p <= 32 * KiB else None),
    ("kernel", "memcpy_batch", "cudaMemcpyBatchAsync", lambda p: None),
    ("copier", "bound", "one cudaMemcpyAsync of the same bytes", lambda p: None),
]
METHODS = ("kernel", "copier", "memcpy_loop", "memcpy_batch", "bound")


class Bench:
    """Buffers, stream and timers shared by every case (torch and kvtier are imported lazily)."""

    def __init__(self, torch: Any, copier: Any, max_bytes: int, samples: int, stat: str, quick: bool) -> None:
        self.torch = torch
        self.copier = copier
        self.lib = copier.library
        self.dev = copier.device
        self.stream = torch.cuda.Stream(device=self.dev)
        self.samples = samples
        self.reduce = min if stat == "best" else statistics.median
        self.sample_s = 0.03 if quick else 0.05  # seconds per timed sample
        self.gpu = torch.cuda.get_device_name(self.dev)
        self.batch_error: str | None = None  # set when cudaMemcpyBatchAsync fails
        self.device_buf = torch.randint(0, 256, (2 * max_bytes,), dtype=torch.uint8, device=self.dev)
        self._map = mmap.mmap(-1, max_bytes)  # like the arena: a shared mapping, registered with CUDA
        self.arena = torch.frombuffer(self._map, dtype=torch.uint8)
        t0 = time.perf_counter()
        self.arena_dev = copier.register_host(self.arena)
        print(f"registered a {fmt_size(max_bytes)} host arena with CUDA in {time.perf_counter() - t0:.2f} s")
        self.stream.wait_stream(torch.cuda.current_stream(self.dev))

    def gpu_time(self, op: Callable[[], object]) -> float:
        """Seconds per ``op`` on the stream (CUDA events): a warm-up, then ``samples`` timed loops."""
        torch, s = self.torch, self.stream
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed(iters: int) -> float:
            start.record(s)
            for _ in range(iters):
                op()
            end.record(s)
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters

        with torch.cuda.stream(s):
            op()
            iters = int(min(2000, max(3, self.sample_s / max(timed(1), 1e-6))))
            return self.reduce([timed(iters) for _ in range(self.samples)])

    def wall_time(self, op: Callable[[], Any]) -> float:
        """Seconds per ``op`` (which returns a copy handle) on the host clock, calls back to back."""
        op().wait()
        t = time.perf_counter()
        op().wait()
        iters = int(min(2000, max(3, self.sample_s / max(time.perf_counter() - t, 1e-6))))

        def timed() -> float:
            t = time.perf_counter()
            handles = [op() for _ in range(iters)]
            handles[-1].wait()
            return (time.perf_counter() - t) / iters

        return self.reduce([timed() for _ in range(self.samples)])

    def memcpy(self, dsts: Any, srcs: Any, sizes: Any, *, batched: bool) -> bool:
        """Copy-engine baseline; True if cudaMemcpyBatchAsync ran. A batch API failure is reported
        once and the loop is used instead, so one bad driver call does not lose the whole run."""
        from kvtier.errors import CopyError

        args = (dsts.data_ptr(), srcs.data_ptr(), sizes.data_ptr(), int(sizes.numel()), self.dev.index)
        if batched and self.batch_error is None:
            try:
                return self.lib.memcpy_ranges(*args, self.stream.cuda_stream, batched=True)
            except CopyError as exc:
                self.batch_error = str(exc)
                print(f"warning: {exc}; memcpy_batch now measures the per-page loop", file=sys.stderr)
        self.lib.memcpy_ranges(*args, self.stream.cuda_stream, batched=False)
        return False

    def case(self, page: int, n: int, gather: bool) -> tuple[dict[str, float], dict[str, Any]]:
        """GB/s of every method for ``n`` random pages of ``page`` bytes, and the case's facts."""
        from kvtier.copy.layout import (
            Direction,
            choose_chunk_bytes,
            describe_paged_kv,
            make_request,
            plan_segments,
        )

        torch, dev, arena, lib, stream = self.torch, self.dev, self.arena, self.lib, self.stream
        total = page * n
        kv_rows = self.device_buf[: 2 * total].view(2 * n, page)  # 2n blocks, n of them copied
        kv = describe_paged_kv([kv_rows])
        ids = torch.randperm(2 * n)[:n]
        ids_dev = ids.to(dev)
        offsets = torch.arange(n, dtype=torch.int64) * page
        slots = arena[:total].view(n, page)
        request = make_request(kv, ids, arena, offsets, Direction.GATHER if gather else Direction.SCATTER)
        table = plan_segments(kv, request, self.arena_dev, chunk_bytes=choose_chunk_bytes(total)).to(dev)

        # Fresh bytes on the source side, zeros on the destination side: a copy that does nothing
        # (or copies the wrong pages) cannot pass the check below on leftovers of earlier cases.
        kv_rows.random_(0, 256)
        if gather:
            slots.zero_()
        else:
            slots.copy_(kv_rows[:n].flip(0).cpu())
            kv_rows.index_fill_(0, ids_dev, 0)
        torch.cuda.current_stream(dev).synchronize()
        t = {
            "kernel": self.gpu_time(
                lambda: lib.copy_segments(table.data_ptr(), len(table), dev.index, stream.cuda_stream)
            )
        }
        verified = torch.equal(kv_rows.index_select(0, ids_dev), slots.to(dev))

        submit = self.copier.gather if gather else self.copier.scatter
        t["copier"] = self.wall_time(lambda: submit(kv, ids, arena, offsets))

        page_ptrs = kv_rows[0].data_ptr() + ids * page
        slot_ptrs = arena.data_ptr() + offsets  # host addresses: the copy engines take them as they are
        dsts, srcs = (slot_ptrs, page_ptrs) if gather else (page_ptrs, slot_ptrs)
        sizes = torch.full((n,), page, dtype=torch.int64)
        t["memcpy_loop"] = self.gpu_time(lambda: self.memcpy(dsts, srcs, sizes, batched=False))
        batch_used = self.memcpy(dsts, srcs, sizes, batched=True)
        t["memcpy_batch"] = self.gpu_time(lambda: self.memcpy(dsts, srcs, sizes, batched=True))
        host0 = torch.tensor([arena.data_ptr()], dtype=torch.int64)
        dev0 = torch.tensor([self.device_buf.data_ptr()], dtype=torch.int64)
        whole = torch.tensor([total], dtype=torch.int64)
        to, frm = (host0, dev0) if gather else (dev0, host0)
        t["bound"] = self.gpu_time(lambda: self.memcpy(to, frm, whole, batched=False))
        stream.synchronize()

        facts = {
            "gpu": self.gpu,
            "direction": "d2h" if gather else "h2d",
            "page_bytes": page,
            "pages": n,
            "bytes": total,
            "segments": len(table),
            "verified": verified,
            "batch_api_used": batch_used,
            "batch_error": self.batch_error,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
        return {k: total / s / 1e9 for k, s in t.items()}, facts


def rows_for(label: str, page: int, speed: dict[str, float], facts: dict[str, Any]) -> list[Row]:
    return [
        Row(case=label, metric=f"{what}_GBps_vs_{base}", value=speed[what], baseline=speed[base], unit=GBPS,
            target=target_of(page), bound=bound, extra=facts)
        for what, base, bound, target_of in COMPARISONS
    ]  # fmt: skip


def summarize_scopes(rows: Sequence[Row]) -> None:
    """Targets met over all batches and over batches of >= 64 pages (where per-page overheads count)."""
    for metric in ("kernel_GBps_vs_bound", "kernel_GBps_vs_memcpy_loop"):
        for floor in (1, 64):
            sel = [
                r for r in rows if r.metric == metric and r.target is not None and r.extra["pages"] >= floor
            ]
            worst = min(sel, key=lambda r: r.ratio, default=None)
            tail = f"; worst {worst.case} at {worst.ratio:.2f}" if worst else ""
            print(
                f"  {metric} (batches >= {floor} pages): {sum(bool(r.met) for r in sel)}/{len(sel)} met{tail}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--max-bytes", type=int, default=None, help="largest batch (default 1 GiB; --quick 512 MiB)"
    )
    parser.add_argument(
        "--lib", default=None, help="libkvtier_copy.so (default: $KVTIER_COPY_LIB, build cache)"
    )
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("benchmarks/copy.py: PyTorch is not installed: nothing measured, nothing written")
        return 0
    if not torch.cuda.is_available():
        print(
            "benchmarks/copy.py: no CUDA GPU (torch.cuda.is_available() is False): nothing measured, nothing written"
        )
        return 0

    from kvtier.copy.cuda_backend import CudaKernelPageCopier
    from kvtier.errors import KernelUnavailableError

    try:
        copier = CudaKernelPageCopier("cuda", lib_path=args.lib)
    except KernelUnavailableError as exc:
        print(f"benchmarks/copy.py: {exc}", file=sys.stderr)
        return 2
    cmd = command_line()
    max_bytes = args.max_bytes or (512 * MiB if args.quick else GiB)
    bench = Bench(torch, copier, max_bytes, repeats(args), args.stat, args.quick)
    print(f"$ {cmd}\n{bench.gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"cudaMemcpyBatchAsync compiled in: {bench.lib.memcpy_batch_compiled}; GB/s = 1e9 B/s", flush=True)  # fmt: skip
    print(f"{'case':<22}" + "".join(f"{m:>13}" for m in METHODS) + "  exact")
    rows: list[Row] = []
    pages_list, batches = (QUICK_PAGES, QUICK_BATCHES) if args.quick else (FULL_PAGES, FULL_BATCHES)
    for page in pages_list:
        for n in batches:
            if page * n > max_bytes:
                continue
            for gather in (True, False):
                speed, facts = bench.case(page, n, gather)
                label = f"{facts['direction']} {fmt_size(page)} x{n}"
                rows += rows_for(label, page, speed, facts)
                cells = "".join(f"{speed[m]:13.2f}" for m in METHODS)
                print(f"{label:<22}{cells}  {'yes' if facts['verified'] else 'NO'}", flush=True)
    copier.close()  # unregisters the arena; the mapping goes with the process

    print()
    print_table(rows, columns=("case", "metric", "value", "baseline", "ratio", "target", "met", "verified"))
    print()
    summarize_targets(rows)
    summarize_scopes(rows)
    bad = sorted({r.case for r in rows if not r.extra["verified"]})
    print(f"byte-exact check of the kernel: {'all passed' if not bad else 'FAILED: ' + ', '.join(bad)}")
    if not args.no_write:
        print(f"wrote {write_results('copy', rows)}")
    print(f"command: {cmd}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
