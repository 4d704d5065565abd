"""The page-copy interface: :class:`PageCopier` and the :class:`CopyHandle` it returns.

Contract shared by every backend:

- ``gather`` copies each listed block's pages from the paged KV cache into its host slot;
  ``scatter`` copies slots back into the blocks. Slot format: see :mod:`kvtier.copy.layout`.
- Both validate the whole request first and raise :class:`~kvtier.errors.CopyError` before any
  byte moves. They never wait for the device: they return a handle at once.
- Copies are ordered after the work already queued on the current CUDA stream of the KV device
  (so a gather sees the forward pass's writes). Until ``handle.done()`` is true the caller must
  not modify the gathered blocks or read the scattered ones, nor touch the slots involved; the
  handle keeps the tensors it needs alive.
- ``done()`` never blocks; ``wait()`` blocks until the copy finished. Both raise ``CopyError`` if
  the device reported a failure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from kvtier.copy.layout import (
    CopyRequest,
    Direction,
    IndexLike,
    KVCaches,
    PagedKV,
    describe_paged_kv,
    make_request,
)
from kvtier.errors import CopyError

if TYPE_CHECKING:
    import torch


class CopyHandle(ABC):
    """A submitted copy. ``nbytes`` and ``num_pages`` describe what it moves."""

    def __init__(self, nbytes: int, num_pages: int) -> None:
        self.nbytes = nbytes
        self.num_pages = num_pages

    @abstractmethod
    def done(self) -> bool:
        """True once every byte has landed; never blocks."""

    @abstractmethod
    def wait(self) -> None:
        """Block until the copy has finished."""


class CompletedHandle(CopyHandle):
    """A copy that had finished before it was returned (CPU copies, empty requests)."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


class CudaEventHandle(CopyHandle):
    """A copy tracked by a ``torch.cuda.Event`` recorded on the copy's stream after its last op."""

    def __init__(
        self, event: torch.cuda.Event, nbytes: int, num_pages: int, keepalive: tuple[Any, ...]
    ) -> None:
        super().__init__(nbytes, num_pages)
        self._event = event
        self._keepalive: tuple[Any, ...] | None = keepalive
        self._done = False

    @property
    def event(self) -> torch.cuda.Event:
        """The completion event: ``stream.wait_event(handle.event)`` orders GPU work after the copy
        without blocking the host (the handle must stay referenced until ``done()``)."""
        return self._event

    def done(self) -> bool:
        if not self._done:
            try:
                self._done = bool(self._event.query())
            except RuntimeError as exc:  # a sticky CUDA error, e.g. an illegal address
                raise CopyError(f"page copy failed on the device: {exc}") from exc
            if self._done:
                self._keepalive = None
        return self._done

    def wait(self) -> None:
        if not self._done:
            try:
                self._event.synchronize()
            except RuntimeError as exc:
                raise CopyError(f"page copy failed on the device: {exc}") from exc
            self._done = True
            self._keepalive = None


class PageCopier(ABC):
    """Copies KV pages between a paged KV cache and a host arena. See the module docstring.

    ``kv`` may be the raw tensors (described on every call) or a :class:`PagedKV` from
    :func:`~kvtier.copy.layout.describe_paged_kv`, described once at ``register_kv_caches`` time,
    which is what the hot path should pass.
    """

    #: Backend name in :func:`kvtier.copy.make_page_copier`'s registry.
    name: ClassVar[str]

    def gather(
        self, kv: KVCaches | PagedKV, block_ids: IndexLike, host: torch.Tensor, offsets: IndexLike
    ) -> CopyHandle:
        """Copy block ``block_ids[i]`` into ``host[offsets[i]:][:slot_nbytes]`` for every ``i``."""
        return self._submit(kv, block_ids, host, offsets, Direction.GATHER)

    def scatter(
        self, kv: KVCaches | PagedKV, block_ids: IndexLike, host: torch.Tensor, offsets: IndexLike
    ) -> CopyHandle:
        """Copy ``host[offsets[i]:][:slot_nbytes]`` into block ``block_ids[i]`` for every ``i``."""
        return self._submit(kv, block_ids, host, offsets, Direction.SCATTER)

    def _submit(
        self,
        kv: KVCaches | PagedKV,
        block_ids: IndexLike,
        host: torch.Tensor,
        offsets: IndexLike,
        direction: Direction,
    ) -> CopyHandle:
        paged = describe_paged_kv(kv)
        request = make_request(paged, block_ids, host, offsets, direction)
        if request.num_blocks == 0:
            return CompletedHandle(0, 0)
        return self._copy(paged, request)

    @abstractmethod
    def _copy(self, kv: PagedKV, request: CopyRequest) -> CopyHandle:
        """Move the bytes of a validated, non-empty request."""

    def register_host(self, host: torch.Tensor) -> Any:  # noqa: B027 - optional hook
        """Prepare ``host`` for copies now rather than on the first copy (CUDA: pin it)."""

    def unregister_host(self, host: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Forget ``host`` before its memory is unmapped (backends that register host memory)."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the copier holds (streams, host registrations). Idempotent."""

    def __enter__(self) -> PageCopier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def handle_size(kv: PagedKV, request: CopyRequest) -> tuple[int, int]:
    """``(nbytes, num_pages)`` moved by ``request``."""
    return request.num_blocks * kv.slot_nbytes, request.num_blocks * len(kv.pages)
