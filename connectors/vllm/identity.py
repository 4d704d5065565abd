"""What makes a vLLM worker's KV blocks interchangeable (its kvtier layout) and the kvtier block
hashes of a request. Both the scheduler and the workers derive layouts from the same vLLM
config with :func:`layout_for_rank`, so the scheduler can look blocks up for every rank."""

from __future__ import annotations

from typing import TYPE_CHECKING

from connectors.vllm.weights import weights_fingerprint
from kvtier.blocks import HashExtras, KVLayout, MultimodalItem
from kvtier.errors import LayoutError

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def layout_for_rank(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, tp_rank: int, model_id: str | None = None,
    model_revision: str | None = None,
) -> KVLayout:
    """The layout of one tensor-parallel rank's KV blocks (single-group, attention-only models).
    ``model_revision`` names the weights; by default it is a fingerprint of the weight files
    (:mod:`connectors.vllm.weights`), and weights that cannot be found raise LayoutError."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise LayoutError(f"KVTierConnector supports models with one KV cache group; this one has {len(groups)}")
    spec = groups[0].kv_cache_spec
    for field in ("num_kv_heads", "head_size", "dtype"):
        if not hasattr(spec, field):
            raise LayoutError(f"KVTierConnector needs attention KV caches; got {type(spec).__name__}")
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1:
        raise LayoutError(f"pipeline parallelism ({parallel.pipeline_parallel_size} stages) is not supported: a stage holds only "
                          "its own layers, which kvtier's layouts do not record yet; run with pipeline_parallel_size=1")
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = _dtype_name(spec.dtype) if cache_dtype == "auto" else _CACHE_DTYPES.get(cache_dtype, _dtype_name(spec.dtype))
    head_size_v = getattr(spec, "head_size_v", None)
    return KVLayout(
        model=model_id or model.model,
        model_revision=model_revision or weights_fingerprint(model.model, model.revision),
        dtype=dtype,
        num_layers=len(groups[0].layer_names),
        num_kv_heads=spec.num_kv_heads,
        head_size=spec.head_size,
        head_size_v=None if head_size_v in (None, spec.head_size) else head_size_v,
        block_size=spec.block_size,
        tp_rank=tp_rank,
        tp_size=parallel.tensor_parallel_size,
        pp_rank=0,
        pp_size=1,
        page_layout=kv_cache_config.kv_cache_layout or "LBHNC",
        kv_format="mla" if getattr(model, "use_mla", False) else "kv_concat",
    )


def hash_extras(request: Request) -> HashExtras:
    """LoRA adapter, cache salt and multimodal items of a request, as kvtier hashes them."""
    lora = getattr(request, "lora_request", None)
    items = []
    for feature in getattr(request, "mm_features", None) or ():
        position = getattr(feature, "mm_position", None)
        if position is not None:
            items.append(MultimodalItem(str(feature.identifier), int(position.offset), int(position.length)))
    return HashExtras(
        lora_name=getattr(lora, "lora_name", None) if lora is not None else None,
        cache_salt=getattr(request, "cache_salt", None),
        multimodal=tuple(items),
    )
