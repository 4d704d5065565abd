"""Test helpers that ship with kvtier (heavy dependencies are imported lazily).

- :mod:`kvtier.testing.tiny_model`: a small, deterministic, context-sensitive Llama model made
  locally (no download) for vLLM end-to-end tests.
"""

from __future__ import annotations

from typing import Any

__all__ = ["make_tiny_model", "tiny_model_path"]


def make_tiny_model(*args: Any, **kwargs: Any):
    from kvtier.testing.tiny_model import make_tiny_model as _make

    return _make(*args, **kwargs)


def tiny_model_path(**kwargs: Any):
    from kvtier.testing.tiny_model import tiny_model_path as _path

    return _path(**kwargs)
