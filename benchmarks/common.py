"""Helpers shared by every benchmark: rows, interleaved timing, the table, the results file.

Every benchmark reports figures as a ratio to a bound measured in the same run, because the
machines they run on are shared and noisy: absolute numbers drift from run to run, a ratio of
two measurements taken alternately (:func:`compare`) much less.

A result row (:class:`Row`) is written to ``benchmarks/results/<name>.json`` as one JSON object
with at least ``case``, ``metric``, ``value``, ``baseline`` and ``ratio`` (``value / baseline``),
plus ``unit``, ``better`` (``"higher"`` or ``"lower"``), ``target`` and ``met`` when a target is
set, and any extra fields the benchmark adds (``block_size``, ``batch``, ``bytes``...).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

RESULTS_DIR = Path(__file__).resolve().parent / "results"

Stat = Literal["median", "best"]
Better = Literal["higher", "lower"]


# ---- rows --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    """One figure next to its bound. ``ratio = value / baseline``; ``met`` compares it to ``target``
    (``ratio >= target`` when higher is better, ``ratio <= target`` when lower is)."""

    case: str  # what was measured, unique within a benchmark (e.g. "host.put 64KiB x8")
    metric: str  # the quantity (e.g. "put_throughput")
    value: float  # kvtier's figure
    baseline: float  # the bound's figure, measured in the same run
    unit: str = ""
    better: Better = "higher"
    target: float | None = None  # wanted ratio; None = informative only
    bound: str = ""  # what the baseline is (e.g. "memcpy")
    extra: dict[str, Any] = field(default_factory=dict)  # block_size, batch, bytes...

    @property
    def ratio(self) -> float:
        if self.baseline == 0:
            return float("inf") if self.value else float("nan")
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio >= self.target if self.better == "higher" else self.ratio <= self.target

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "case": self.case,
            "metric": self.metric,
            "value": _round(self.value),
            "baseline": _round(self.baseline),
            "ratio": _round(self.ratio),
            "unit": self.unit,
            "better": self.better,
            "bound": self.bound,
        }
        if self.target is not None:
            out["target"] = self.target
            out["met"] = self.met
        out.update(self.extra)
        return out


def _round(x: float) -> float:
    return float(f"{x:.6g}")


# ---- timing ------------------------------------------------------------------------------------


def _reduce(samples: Sequence[float], stat: Stat) -> float:
    return min(samples) if stat == "best" else statistics.median(samples)


def time_once(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
    """Seconds one call of ``fn`` takes (``setup`` runs first, untimed)."""
    if setup is not None:
        setup()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(
    candidate: Callable[[], object],
    bound: Callable[[], object],
    *,
    repeat: int = 5,
    warmup: int = 1,
    stat: Stat = "median",
    setup_candidate: Callable[[], object] | None = None,
    setup_bound: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """Time ``candidate`` and ``bound`` alternately (order flipped every round so neither always
    goes first); return their median (or best) seconds as ``(candidate, bound)``.

    Interleaving makes both see the same machine: a burst of load from elsewhere slows one round
    of each instead of every run of one of them.
    """
    for _ in range(warmup):
        time_once(candidate, setup_candidate)
        time_once(bound, setup_bound)
    cand: list[float] = []
    base: list[float] = []
    for i in range(repeat):
        if i % 2 == 0:
            cand.append(time_once(candidate, setup_candidate))
            base.append(time_once(bound, setup_bound))
        else:
            base.append(time_once(bound, setup_bound))
            cand.append(time_once(candidate, setup_candidate))
    return _reduce(cand, stat), _reduce(base, stat)


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in GB/s (10**9 bytes per second)."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


# ---- sizes -------------------------------------------------------------------------------------


def fmt_size(nbytes: int) -> str:
    """``65536`` -> ``"64KiB"``; exact binary units only, bytes otherwise."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


# ---- command line ------------------------------------------------------------------------------


def make_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes: ``--quick``, ``--repeat``,
    ``--stat`` and ``--no-write``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats (about a minute)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per case (default: 3 quick, 5 full)")
    parser.add_argument(
        "--stat", choices=("median", "best"), default="median", help="how repeated runs are reduced (default median)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only; do not write results")
    return parser


def repeats(args: argparse.Namespace, quick: int = 3, full: int = 5) -> int:
    return args.repeat if args.repeat else (quick if args.quick else full)


def command_line() -> str:
    """The command that started this process, as one could paste it into a shell."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        argv = [os.path.basename(sys.executable), "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    else:
        argv = [os.path.basename(sys.executable), *sys.argv]
    return shlex.join(argv)


# ---- output ------------------------------------------------------------------------------------

DEFAULT_COLUMNS = ("case", "metric", "value", "baseline", "ratio", "target", "met", "bound")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_table(rows: Iterable[Row | dict[str, Any]], columns: Sequence[str] = DEFAULT_COLUMNS, file=None) -> None:
    """Print rows as an aligned text table (``value`` and ``baseline`` carry the row's unit)."""
    dicts = [r.to_dict() if isinstance(r, Row) else r for r in rows]
    header = list(columns)
    body = []
    for d in dicts:
        cells = []
        for col in columns:
            cell = _cell(d.get(col))
            if col in ("value", "baseline") and d.get("unit") and cell:
                cell = f"{cell} {d['unit']}"
            if col == "target" and cell:
                cell = (">=" if d.get("better", "higher") == "higher" else "<=") + cell
            cells.append(cell)
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    out = file or sys.stdout
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for cells in body:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip(), file=out)


def summarize_targets(rows: Iterable[Row], file=None) -> tuple[int, int]:
    """Print how many targeted rows met their target and list the misses; return (met, total)."""
    targeted = [r for r in rows if r.target is not None]
    missed = [r for r in targeted if not r.met]
    out = file or sys.stdout
    print(f"targets met: {len(targeted) - len(missed)}/{len(targeted)}", file=out)
    for r in missed:
        sign = ">=" if r.better == "higher" else "<="
        print(f"  MISSED {r.case}: ratio {r.ratio:.3g} (target {sign}{r.target}, bound {r.bound})", file=out)
    return len(targeted) - len(missed), len(targeted)


def write_results(name: str, rows: Iterable[Row | dict[str, Any]], directory: Path = RESULTS_DIR) -> Path:
    """Write rows as a JSON list to ``<directory>/<name>.json``; return the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    data = [r.to_dict() if isinstance(r, Row) else r for r in rows]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def run_benchmark(
    name: str,
    description: str,
    run: Callable[[argparse.Namespace], list[Row]],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The main() of a benchmark: parse flags (the common ones and ``add_arguments``'), run,
    print the table and targets, write results."""
    parser = make_parser(description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    rows = run(args)
    print_table(rows)
    summarize_targets(rows)
    if not args.no_write:
        print(f"wrote {write_results(name, rows)}")
    print(f"command: {command_line()}")
    return 0
