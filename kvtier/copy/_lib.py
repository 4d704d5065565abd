"""ctypes binding of ``libkvtier_copy.so`` (``csrc/kvtier_copy.cu``). No torch import here.

The library is found at, in order: an explicit path, ``$KVTIER_COPY_LIB``, and the build cache
(``$XDG_CACHE_HOME/kvtier/libkvtier_copy.so``, else ``~/.cache/kvtier/``) where
``python -m kvtier.copy.build`` puts it. A missing or stale library, or a machine without a CUDA
device, raises :class:`~kvtier.errors.KernelUnavailableError`; CUDA errors from calls become
:class:`~kvtier.errors.CopyError`.

Host registrations (``cudaHostRegister``) are process-wide in CUDA, so they are reference
counted here, per library, by start address.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kvtier.errors import CopyError, KernelUnavailableError

#: Must equal KVTIER_COPY_ABI_VERSION in csrc/kvtier_copy.h.
ABI_VERSION = 1
LIB_ENV = "KVTIER_COPY_LIB"
LIB_NAME = "libkvtier_copy.so"
BUILD_HINT = (
    "build it with `python -m kvtier.copy.build` (needs nvcc) or point $KVTIER_COPY_LIB at a built copy"
)

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_U64 = ctypes.c_uint64


def default_library_path() -> Path:
    """``$KVTIER_COPY_LIB`` if set, else the build cache location."""
    env = os.environ.get(LIB_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtier" / LIB_NAME


@dataclass(slots=True)
class _Registration:
    nbytes: int
    device_address: int
    owned: bool  # registered by us (so we unregister it when the last user releases it)
    refs: int


class KernelLibrary:
    """The loaded library. Methods raise :class:`CopyError` when CUDA returns an error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise KernelUnavailableError(
                f"cannot load the copy kernel library {path}: {exc}; {BUILD_HINT}"
            ) from exc
        self._lib = lib
        lib.kvtier_copy_abi_version.restype = _INT
        lib.kvtier_copy_abi_version.argtypes = []
        abi = lib.kvtier_copy_abi_version()
        if abi != ABI_VERSION:
            raise KernelUnavailableError(
                f"{path} has ABI version {abi}, this kvtier needs {ABI_VERSION}: it is stale; {BUILD_HINT}"
            )
        lib.kvtier_error_string.restype = ctypes.c_char_p
        lib.kvtier_error_string.argtypes = [_INT]
        lib.kvtier_device_count.restype = _INT
        lib.kvtier_device_count.argtypes = [ctypes.POINTER(_INT)]
        lib.kvtier_copy_segments.restype = _INT
        lib.kvtier_copy_segments.argtypes = [_P, _I64, _INT, _P]
        lib.kvtier_memcpy_ranges.restype = _INT
        lib.kvtier_memcpy_ranges.argtypes = [_P, _P, _P, _I64, _INT, _P, _INT, ctypes.POINTER(_INT)]
        lib.kvtier_memcpy_batch_compiled.restype = _INT
        lib.kvtier_memcpy_batch_compiled.argtypes = []
        lib.kvtier_host_register.restype = _INT
        lib.kvtier_host_register.argtypes = [_P, _U64, _INT, ctypes.POINTER(_U64), ctypes.POINTER(_INT)]
        lib.kvtier_host_unregister.restype = _INT
        lib.kvtier_host_unregister.argtypes = [_P]
        self.memcpy_batch_compiled = bool(lib.kvtier_memcpy_batch_compiled())
        self._registrations: dict[int, _Registration] = {}
        self._lock = threading.Lock()

    def error_string(self, code: int) -> str:
        text = self._lib.kvtier_error_string(code)
        return text.decode(errors="replace") if text else f"CUDA error {code}"

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise CopyError(f"{what} failed: CUDA error {code} ({self.error_string(code)})")

    def device_count(self) -> int:
        """CUDA devices visible to the library; raises :class:`KernelUnavailableError` if none."""
        count = _INT(0)
        code = self._lib.kvtier_device_count(ctypes.byref(count))
        if code != 0 or count.value == 0:
            reason = self.error_string(code) if code else "no device found"
            raise KernelUnavailableError(f"the copy kernel needs a CUDA device: {reason}")
        return count.value

    def copy_segments(self, segments: int, count: int, device: int, stream: int) -> None:
        """Launch the kernel over ``count`` segments at device address ``segments`` on ``stream``."""
        self._check(
            self._lib.kvtier_copy_segments(segments, count, device, stream), "launching the page-copy kernel"
        )

    def memcpy_ranges(
        self, dsts: int, srcs: int, sizes: int, count: int, device: int, stream: int, *, batched: bool
    ) -> bool:
        """Benchmark baseline: copy ranges given as host uint64 arrays; True if the batch API ran."""
        used = _INT(0)
        code = self._lib.kvtier_memcpy_ranges(
            dsts, srcs, sizes, count, device, stream, int(batched), ctypes.byref(used)
        )
        self._check(code, "cudaMemcpyBatchAsync" if batched else "cudaMemcpyAsync")
        return used.value == 1

    def register_host(self, address: int, nbytes: int, device: int) -> int:
        """Pin and map ``[address, address + nbytes)``; return its device address. Reference counted."""
        with self._lock:
            reg = self._registrations.get(address)
            if reg is not None and reg.nbytes >= nbytes:
                reg.refs += 1
                return reg.device_address
            if reg is not None:
                raise CopyError(
                    f"host memory at {address:#x} is registered for {reg.nbytes} B, now asked for {nbytes} B: "
                    "release the smaller registration first"
                )
            dev = _U64(0)
            owned = _INT(0)
            code = self._lib.kvtier_host_register(
                address, nbytes, device, ctypes.byref(dev), ctypes.byref(owned)
            )
            if code != 0:
                raise CopyError(
                    f"cannot register {nbytes} B of host memory at {address:#x} with CUDA: error {code} "
                    f"({self.error_string(code)}); the arena must be writable memory (e.g. a MAP_SHARED mapping "
                    "opened read-write) and the memlock limit must allow pinning it"
                )
            self._registrations[address] = _Registration(nbytes, dev.value, bool(owned.value), 1)
            return dev.value

    def release_host(self, address: int) -> None:
        """Drop one reference; unregister when the last one goes (if we registered it)."""
        with self._lock:
            reg = self._registrations.get(address)
            if reg is None:
                return
            reg.refs -= 1
            if reg.refs > 0:
                return
            del self._registrations[address]
            if reg.owned:
                self._check(self._lib.kvtier_host_unregister(address), "cudaHostUnregister")


@cache
def _load(path: str) -> KernelLibrary:
    return KernelLibrary(Path(path))


def load_library(path: str | os.PathLike[str] | None = None) -> KernelLibrary:
    """Load (once per path) the kernel library; raise :class:`KernelUnavailableError` if absent."""
    resolved = Path(path) if path is not None else default_library_path()
    if not resolved.is_file():
        raise KernelUnavailableError(
            f"the CUDA copy kernel is not built ({resolved} does not exist); {BUILD_HINT}"
        )
    return _load(str(resolved.resolve()))
