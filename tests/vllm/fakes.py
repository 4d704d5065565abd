"""vLLM configs for the connector's halves without an engine: what their constructors read."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

FAKE_BACKEND = "FLASH_ATTN"


def fake_configs(model: str = "test/model", tp_size: int = 1, pp_size: int = 1, block_size: int = 16, replicas: int = 1,
                 use_mla: bool = False) -> tuple[Any, Any]:
    """(vllm_config, kv_cache_config) of a one-layer fp16 model with 2 KV heads of 64."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=64, dtype=torch.float16)
    kv_cache_config = KVCacheConfig(num_blocks=4, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)],
                                    kv_tp_replicas=replicas)
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(model=model, revision=None, use_mla=use_mla),
                                  parallel_config=SimpleNamespace(tensor_parallel_size=tp_size, pipeline_parallel_size=pp_size, rank=0),
                                  cache_config=SimpleNamespace(cache_dtype="auto"))
    return vllm_config, kv_cache_config


@pytest.fixture
def fake_attention_backend(monkeypatch: pytest.MonkeyPatch) -> str:
    """vLLM's selector reads a whole engine config, which these fakes are not: name a backend instead."""
    monkeypatch.setattr("connectors.vllm.identity.selected_attention_backend", lambda vllm_config: FAKE_BACKEND)
    return FAKE_BACKEND
