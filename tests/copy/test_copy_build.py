"""CI's compile check: the kernel builds with plain nvcc for sm_80 and sm_90, warnings as errors,
and the library loads through the ctypes binding (no GPU needed to load it)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
import torch

from kvtier.copy._lib import ABI_VERSION, KernelLibrary, default_library_path
from kvtier.copy.build import build, find_nvcc, gencode_flags, main, source_path
from kvtier.errors import KernelUnavailableError

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc not installed")
EXPORTS = (
    "kvtier_copy_abi_version",
    "kvtier_error_string",
    "kvtier_device_count",
    "kvtier_copy_segments",
    "kvtier_memcpy_ranges",
    "kvtier_memcpy_batch_compiled",
    "kvtier_host_register",
    "kvtier_host_unregister",
)


@pytest.fixture(scope="module")
def built_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if find_nvcc() is None:
        pytest.skip("nvcc not installed")
    return build(["sm_80", "sm_90"], tmp_path_factory.mktemp("lib") / "libkvtier_copy.so", werror=True)


@needs_nvcc
def test_compiles_for_sm80_and_sm90(built_lib: Path) -> None:
    data = built_lib.read_bytes()
    for arch in (b"sm_80", b"sm_90"):
        assert b"-arch " + arch in data, f"no {arch.decode()} machine code in the fatbinary"
    lib = ctypes.CDLL(str(built_lib))
    for name in EXPORTS:
        assert hasattr(lib, name), name


@needs_nvcc
def test_library_loads_through_binding(built_lib: Path) -> None:
    lib = KernelLibrary(built_lib)
    assert lib._lib.kvtier_copy_abi_version() == ABI_VERSION
    assert lib.memcpy_batch_compiled  # CUDA >= 12.8 toolkits have cudaMemcpyBatchAsync
    assert "no error" in lib.error_string(0)
    if not torch.cuda.is_available():
        with pytest.raises(KernelUnavailableError, match="needs a CUDA device"):
            lib.device_count()


def test_abi_version_matches_header() -> None:
    header = (source_path().parent / "kvtier_copy.h").read_text()
    assert f"#define KVTIER_COPY_ABI_VERSION {ABI_VERSION}\n" in header


def test_gencode_flags() -> None:
    assert gencode_flags(["sm_80", "90"]) == [
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90",
    ]  # fmt: skip
    assert gencode_flags(["sm_80,sm_80"], ptx=False) == ["-gencode", "arch=compute_80,code=sm_80"]
    with pytest.raises(ValueError, match="bad CUDA architecture"):
        gencode_flags(["ampere"])


def test_cli_reports_missing_nvcc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("KVTIER_NVCC", raising=False)
    monkeypatch.setattr("kvtier.copy.build.find_nvcc", lambda explicit=None: None)
    assert main(["--out", str(tmp_path / "x.so")]) == 1
    assert "nvcc not found" in capsys.readouterr().err
    assert not (tmp_path / "x.so").exists()


def test_default_library_path_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVTIER_COPY_LIB", str(tmp_path / "k.so"))
    assert default_library_path() == tmp_path / "k.so"
    monkeypatch.delenv("KVTIER_COPY_LIB")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_library_path() == tmp_path / "kvtier" / "libkvtier_copy.so"


@needs_nvcc
def test_cli_builds(tmp_path: Path) -> None:
    out = tmp_path / "cli.so"
    assert main(["--arch", "sm_90", "--out", str(out)]) == 0
    assert out.is_file() and os.access(out, os.X_OK)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".kvtier_copy.")]  # no temp left
