"""Backend registry and :func:`make_page_copier`.

Backends are imported lazily by name (``"torch"``, ``"cuda"``), so importing :mod:`kvtier.copy`
costs nothing and a missing kernel only matters to whoever asks for it.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING, Any, Literal

from kvtier.errors import CopyError, KernelUnavailableError

if TYPE_CHECKING:
    import torch

    from kvtier.copy.base import PageCopier

log = logging.getLogger(__name__)

#: name -> "module:Class"
BACKENDS: dict[str, str] = {
    "torch": "kvtier.copy.torch_backend:TorchPageCopier",
    "cuda": "kvtier.copy.cuda_backend:CudaKernelPageCopier",
}


def _backend_class(name: str) -> Any:  # a PageCopier subclass; constructor arguments differ
    try:
        target = BACKENDS[name]
    except KeyError:
        raise CopyError(
            f"unknown copy backend {name!r}; valid: auto, {', '.join(sorted(BACKENDS))}"
        ) from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def make_page_copier(
    device: torch.device | str | int | None = None,
    *,
    backend: Literal["auto", "cuda", "torch"] = "auto",
    lib_path: str | os.PathLike[str] | None = None,
    stream: torch.cuda.Stream | None = None,
    load_stream: torch.cuda.Stream | None = None,
) -> PageCopier:
    """Return a copier for KV caches on ``device``.

    ``backend="auto"``: the CUDA kernel for a CUDA device when the library loads and a GPU is
    present, else the torch backend (logged once at INFO with the reason). ``"cuda"`` raises
    :class:`KernelUnavailableError` instead of falling back. ``lib_path``, ``stream`` (saves) and
    ``load_stream`` (loads) only apply to the CUDA backend. An int ``device`` means ``cuda:<int>``.
    """
    import torch

    dev = torch.device("cpu") if device is None else torch.device(device)
    if backend == "auto":
        if dev.type == "cuda":
            try:
                return _backend_class("cuda")(dev, lib_path=lib_path, stream=stream, load_stream=load_stream)
            except KernelUnavailableError as exc:
                _log_fallback(str(exc))
        return _backend_class("torch")(dev)
    cls = _backend_class(backend)
    if backend == "cuda":
        return cls(dev, lib_path=lib_path, stream=stream, load_stream=load_stream)
    return cls(dev)


_logged: set[str] = set()


def _log_fallback(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.info("kvtier copy: using the torch backend: %s", reason)
