"""Page copies with the kvtier CUDA kernel: one launch per request, whatever the page count.

Per request: plan ``(src, dst, nbytes)`` segments (:func:`~kvtier.copy.layout.plan_segments`,
large pages cut into chunks), upload the table through pinned memory, launch
``kvtier_copy_segments`` and record a ``torch.cuda.Event``, all on one of the copier's two
streams, which first waits for the KV device's current stream: gathers (saves) on
:attr:`~CudaKernelPageCopier.stream`, scatters (loads) on
:attr:`~CudaKernelPageCopier.load_stream`, so a load never queues behind a save's copies. The kernel reaches the host arena through its
mapped device address: the arena's whole allocation (the tensor's storage, e.g. the mmap) is
registered with ``cudaHostRegister`` the first time it is seen, and stays registered until
:meth:`CudaKernelPageCopier.unregister_host` or :meth:`~CudaKernelPageCopier.close`. Unregister
before unmapping the arena. A host tensor that lives on the same CUDA device is used directly.
"""

from __future__ import annotations

import os

import torch

from kvtier.copy._lib import KernelLibrary, load_library
from kvtier.copy.base import CopyHandle, CudaEventHandle, PageCopier, handle_size
from kvtier.copy.layout import CopyRequest, Direction, PagedKV, choose_chunk_bytes, plan_segments
from kvtier.errors import CopyError, KernelUnavailableError


class CudaKernelPageCopier(PageCopier):
    """Copies pages with one kernel launch per request. Raises :class:`KernelUnavailableError`
    at construction when no CUDA device is usable or the library is not built.

    ``stream``: the stream gathers (saves) run on; ``load_stream``: the one scatters (loads) run
    on. By default a new stream each, so copies overlap compute and loads never wait behind saves.
    """

    name = "cuda"

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        *,
        lib_path: str | os.PathLike[str] | None = None,
        stream: torch.cuda.Stream | None = None,
        load_stream: torch.cuda.Stream | None = None,
    ) -> None:
        if not torch.cuda.is_available():
            raise KernelUnavailableError("the CUDA copy kernel needs a CUDA device, and torch sees none")
        dev = torch.device("cuda") if device is None else torch.device(device)
        if dev.type != "cuda":
            raise KernelUnavailableError(
                f"the CUDA copy kernel copies CUDA tensors, not {dev.type} ones: use the torch backend"
            )
        index = torch.cuda.current_device() if dev.index is None else dev.index
        self.device = torch.device("cuda", index)
        self._lib: KernelLibrary = load_library(lib_path)
        self._lib.device_count()
        self._stream = stream if stream is not None else torch.cuda.Stream(device=self.device)
        self._load_stream = load_stream if load_stream is not None else torch.cuda.Stream(device=self.device)
        if self._load_stream == self._stream:
            raise CopyError("loads need a stream of their own: pass a load_stream other than stream")
        self._hosts: dict[int, int] = {}  # storage address -> device address, registered by this copier
        self._closed = False

    @property
    def stream(self) -> torch.cuda.Stream:
        """The stream gathers (saves) run on."""
        return self._stream

    @property
    def load_stream(self) -> torch.cuda.Stream:
        """The stream scatters (loads) run on."""
        return self._load_stream

    def _synchronize(self) -> None:
        self._stream.synchronize()
        self._load_stream.synchronize()

    @property
    def library(self) -> KernelLibrary:
        """The loaded kernel library (the benchmark uses its memcpy baselines)."""
        return self._lib

    def register_host(self, host: torch.Tensor) -> int:
        """Register ``host``'s allocation with CUDA now (else on first use); return the device
        address of ``host[0]``. Registering pins memory and can take a while for large arenas."""
        if host.device.type == "cuda":
            if host.device != self.device:
                raise CopyError(f"host buffer is on {host.device}, the copier on {self.device}")
            return host.data_ptr()
        if host.device.type != "cpu":
            raise CopyError(f"host buffer must be CPU memory (or on {self.device}), got {host.device}")
        storage = host.untyped_storage()
        base = storage.data_ptr()
        dev_base = self._hosts.get(base)
        if dev_base is None:
            dev_base = self._lib.register_host(base, storage.nbytes(), self.device.index)
            self._hosts[base] = dev_base
        return dev_base + (host.data_ptr() - base)

    def unregister_host(self, host: torch.Tensor) -> None:
        """Wait for this copier's copies, then drop its registration of ``host``'s allocation."""
        base = host.untyped_storage().data_ptr()
        if base in self._hosts:
            self._synchronize()
            del self._hosts[base]
            self._lib.release_host(base)

    def _copy(self, kv: PagedKV, request: CopyRequest) -> CopyHandle:
        if self._closed:
            raise CopyError("this copier is closed")
        if kv.device != self.device:
            raise CopyError(f"the KV cache is on {kv.device} but this copier was made for {self.device}")
        host_address = self.register_host(request.host)
        nbytes, num_pages = handle_size(kv, request)
        segments = plan_segments(kv, request, host_address, chunk_bytes=choose_chunk_bytes(nbytes))
        stream = self._load_stream if request.direction is Direction.SCATTER else self._stream
        with torch.cuda.device(self.device):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                staged = segments.pin_memory()
                table = staged.to(self.device, non_blocking=True)
                self._lib.copy_segments(
                    table.data_ptr(), segments.shape[0], self.device.index, stream.cuda_stream
                )
                event = torch.cuda.Event()
                event.record(stream)
        return CudaEventHandle(event, nbytes, num_pages, (staged, table, request, kv))

    def close(self) -> None:
        """Wait for pending copies and release every host registration this copier made."""
        if self._closed:
            return
        self._closed = True
        if self._hosts:
            self._synchronize()
        for base in list(self._hosts):
            del self._hosts[base]
            self._lib.release_host(base)
