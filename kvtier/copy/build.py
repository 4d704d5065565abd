"""Compile ``csrc/kvtier_copy.cu`` into ``libkvtier_copy.so`` with plain nvcc (no torch headers).

Usage::

    python -m kvtier.copy.build [--arch sm_80 --arch sm_90 ...] [--out PATH] [--nvcc PATH] [--src PATH]

The default output is where the loader looks (``$KVTIER_COPY_LIB`` or
``~/.cache/kvtier/libkvtier_copy.so``). Default architectures: sm_80 and sm_90 machine code plus
compute_90 PTX, which newer GPUs JIT-compile. nvcc is taken from ``--nvcc``, ``$KVTIER_NVCC``,
``$CUDA_HOME/bin``, ``PATH``, then ``/usr/local/cuda/bin``. The CUDA runtime is linked statically,
so the library needs only the NVIDIA driver at run time. Needs nothing but the standard library.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kvtier.copy._lib import default_library_path
from kvtier.errors import KernelUnavailableError

DEFAULT_ARCHS = ("sm_80", "sm_90")
SOURCE_ENV = "KVTIER_COPY_SRC"
_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(\d{2,3}[a-z]?)$")


def source_path() -> Path:
    """``$KVTIER_COPY_SRC``, else ``csrc/kvtier_copy.cu`` of the source tree this module is in."""
    env = os.environ.get(SOURCE_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "csrc" / "kvtier_copy.cu"


def find_nvcc(explicit: str | None = None) -> str | None:
    """Path of nvcc, or None when there is none."""
    candidates = [explicit, os.environ.get("KVTIER_NVCC")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def gencode_flags(archs: Sequence[str], *, ptx: bool = True) -> list[str]:
    """``-gencode`` flags for ``archs`` ("sm_90", "90", "sm_90a"); PTX of the newest when ``ptx``."""
    numbers: list[str] = []
    for arch in archs:
        for part in arch.split(","):
            m = _ARCH_RE.match(part.strip())
            if not m:
                raise ValueError(f"bad CUDA architecture {part!r}: expected e.g. sm_80, sm_90 or 90")
            if m.group(1) not in numbers:
                numbers.append(m.group(1))
    if not numbers:
        raise ValueError("no CUDA architecture given")
    flags = []
    for n in numbers:
        flags += ["-gencode", f"arch=compute_{n},code=sm_{n}"]
    if ptx:
        newest = max((n for n in numbers if n.isdigit()), key=int, default=None)
        if newest is not None:
            flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


def nvcc_command(nvcc: str, src: Path, out: Path, archs: Sequence[str], *, werror: bool = False) -> list[str]:
    """The full nvcc command line that :func:`build` runs."""
    cmd = [
        nvcc,
        "-O3",
        "-std=c++17",
        "-shared",
        "-Xcompiler",
        "-fPIC,-Wall",
        "-cudart",
        "static",
        "-lineinfo",
        *gencode_flags(archs),
        "-o",
        str(out),
        str(src),
    ]
    if werror:
        cmd[1:1] = ["-Werror", "all-warnings", "-Xptxas", "-warn-spills,-warn-lmem-usage"]
    return cmd


def build(
    archs: Sequence[str] = DEFAULT_ARCHS,
    out: str | os.PathLike[str] | None = None,
    *,
    nvcc: str | None = None,
    src: str | os.PathLike[str] | None = None,
    werror: bool = False,
    verbose: bool = False,
) -> Path:
    """Compile the library and return its path. The output is replaced atomically.

    Raises :class:`KernelUnavailableError` when nvcc or the source is missing or nvcc fails (its
    output is in the message); ``werror`` turns compiler and ptxas warnings into errors.
    """
    compiler = find_nvcc(nvcc)
    if compiler is None:
        raise KernelUnavailableError(
            "nvcc not found: install the CUDA toolkit or pass --nvcc / set $KVTIER_NVCC"
        )
    source = Path(src) if src is not None else source_path()
    if not source.is_file():
        raise KernelUnavailableError(
            f"kernel source {source} not found: run from a kvtier source tree or set ${SOURCE_ENV}"
        )
    target = Path(out) if out is not None else default_library_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".kvtier_copy.", suffix=".so", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    cmd = nvcc_command(compiler, source, tmp, archs, werror=werror)
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KernelUnavailableError(
                f"nvcc failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
            )
        if verbose and (proc.stdout or proc.stderr):
            print(proc.stdout + proc.stderr, file=sys.stderr)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier.copy.build", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        action="append",
        help="CUDA architecture, repeatable or comma-separated (default: sm_80,sm_90)",
    )
    parser.add_argument("--out", help=f"output path (default: {default_library_path()})")
    parser.add_argument("--nvcc", help="nvcc to use")
    parser.add_argument("--src", help="kernel source (default: csrc/kvtier_copy.cu of this tree)")
    parser.add_argument("--werror", action="store_true", help="treat compiler and ptxas warnings as errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the nvcc command and its output")
    args = parser.parse_args(argv)
    try:
        path = build(
            args.arch or DEFAULT_ARCHS,
            args.out,
            nvcc=args.nvcc,
            src=args.src,
            werror=args.werror,
            verbose=args.verbose,
        )
    except (KernelUnavailableError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
