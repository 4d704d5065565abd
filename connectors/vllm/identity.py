"""What makes a vLLM worker's KV blocks interchangeable (its kvtier layout) and the kvtier block
hashes of a request. Both the scheduler and the workers derive layouts from the same vLLM
config with :func:`layout_for_rank`, so the scheduler can look blocks up for every rank."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from connectors.vllm.weights import weights_fingerprint
from kvtier.blocks import HashExtras, KVLayout, MultimodalItem
from kvtier.errors import LayoutError

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def selected_attention_backend(vllm_config: VllmConfig) -> str:
    """The attention backend vLLM's selector picks for this model (``--attention-backend`` if
    given, else the platform's choice), by vLLM's name for it. The scheduler has no model layers
    to ask, so both halves name the backend this way; the workers then check their layers use it
    (:func:`check_registered`)."""
    try:
        from vllm.config import set_current_vllm_config
        from vllm.v1.attention.selector import get_attn_backend

        model = vllm_config.model_config
        with set_current_vllm_config(vllm_config):
            return get_attn_backend(model.get_head_size(), model.dtype, vllm_config.cache_config.cache_dtype,
                                    use_mla=model.use_mla).get_name()
    except Exception as exc:  # whatever vLLM raises, the backend is unknown: never guess
        raise LayoutError(f"cannot tell which attention backend vLLM selects for this model ({exc})") from exc


def layer_attention_backends(vllm_config: VllmConfig, layer_names: list[str]) -> set[str] | None:
    """The attention backends the model's layers actually use, as a worker sees them after model
    load; None where the config holds no model layers (a connector built outside an engine)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    if not getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None):
        return None
    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
    return {layer.get_attn_backend().get_name() for layer in layers.values()}


# KV quantization whose scales are per tensor (from the checkpoint, covered by the weights
# fingerprint, or 1.0): a block's bytes are then all there is to it. Per-token scales sit in pages
# in a form kvtier's page format does not describe.
_SUPPORTED_QUANT_MODES = ("NONE", "FP8_PER_TENSOR")


def layout_for_rank(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, tp_rank: int, model_id: str | None = None,
    model_revision: str | None = None, attention_backend: str | None = None,
) -> KVLayout:
    """The layout of one tensor-parallel rank's KV blocks (single-group, attention-only models);
    ``tp_rank``/``tp_size`` in it count KV shards, not ranks (ranks with identical KV share one).
    ``model_revision`` names the weights; by default it is a fingerprint of the weight files
    (:mod:`connectors.vllm.weights`), and weights that cannot be found raise LayoutError.
    ``attention_backend`` defaults to :func:`selected_attention_backend`. The layout's ``extra``
    carries the backend, the KV quantization mode and any layers kept out of quantization, so
    engines that differ in any of them never share a block."""
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
    tp_size = parallel.tensor_parallel_size
    kv_format = "mla" if getattr(model, "use_mla", False) else "kv_concat"
    # Consecutive ranks holding identical KV (vLLM's kv_tp_replicas: MLA, or fewer KV heads than
    # ranks) share one layout, so their blocks are stored once.
    replicas = int(getattr(kv_cache_config, "kv_tp_replicas", 1) or 1)
    if replicas == 1 and kv_format == "mla":
        replicas = tp_size
    if tp_size % replicas:
        raise LayoutError(f"{replicas} tensor-parallel ranks hold each KV shard, which does not divide {tp_size} ranks")
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = _dtype_name(spec.dtype) if cache_dtype == "auto" else _CACHE_DTYPES.get(cache_dtype, _dtype_name(spec.dtype))
    head_size_v = getattr(spec, "head_size_v", None)
    quant_mode = getattr(getattr(spec, "kv_quant_mode", None), "name", "NONE")
    if quant_mode not in _SUPPORTED_QUANT_MODES:
        raise LayoutError(f"KV quantization {quant_mode} keeps scales per token inside the pages, which kvtier cannot store "
                          f"yet; use a per-tensor KV cache dtype ({', '.join(_CACHE_DTYPES)}) or auto")
    if getattr(spec, "page_size_padded", None):
        raise LayoutError("vLLM pads this model's KV pages (page_size_padded, a hybrid model's alignment), which kvtier's "
                          "page format does not describe")
    extra = [("attention_backend", attention_backend or selected_attention_backend(vllm_config)), ("kv_quant_mode", quant_mode)]
    skipped = getattr(vllm_config.cache_config, "kv_cache_dtype_skip_layers", None)
    if skipped:
        extra.append(("kv_cache_dtype_skip_layers", ",".join(map(str, skipped))))
    return KVLayout(
        model=model_id or model.model,
        model_revision=model_revision or weights_fingerprint(model.model, model.revision),
        dtype=dtype,
        num_layers=len(groups[0].layer_names),
        num_kv_heads=spec.num_kv_heads,
        head_size=spec.head_size,
        head_size_v=None if head_size_v in (None, spec.head_size) else head_size_v,
        block_size=spec.block_size,
        tp_rank=tp_rank // replicas,
        tp_size=tp_size // replicas,
        pp_rank=0,
        pp_size=1,
        page_layout=kv_cache_config.kv_cache_layout or "LBHNC",
        kv_format=kv_format,
        extra=tuple(extra),
    )


def check_registered(kv_caches: Mapping[str, torch.Tensor], layout: KVLayout, backends: set[str] | None = None) -> None:
    """Check that the tensors vLLM registered hold blocks as ``layout`` says, and that the layers
    use the attention backend it names (``backends``: the layers' own, where known); LayoutError
    naming the first difference otherwise. (fp8 scales are not in the tensors: per-tensor ones come
    from the checkpoint, which the weights fingerprint covers, or are 1.0.)

    vLLM 0.32/0.33 gives every layer a view of logical shape ``[num_blocks, heads, block_size,
    content]`` (``vllm/v1/kv_cache_layout.py``) whose strides follow the physical order; MLA
    caches have no heads axis. The layout id carries the order (``page_layout``), the dtype and
    the shape, so the bytes of a block mean the same in every engine with that id only if its
    tensors are what the id claims: checked here, before a block is saved or loaded."""
    if not kv_caches:
        raise LayoutError("vLLM registered no KV cache tensors for the connector's layers")
    named = dict(layout.extra).get("attention_backend")
    if backends is not None and named is not None and backends != {named}:
        raise LayoutError(f"the model's layers use attention backend {', '.join(sorted(backends))}, not {named} as vLLM "
                          f"selects from the config (which the scheduler goes by); start vLLM with --attention-backend "
                          f"{min(backends)} so both halves agree")
    content = layout.head_size + (layout.head_size_v or layout.head_size)
    if layout.kv_format == "mla":
        page, axes = (layout.block_size, layout.head_size), "[num_blocks, block_size, content]"
    else:
        page, axes = (layout.num_kv_heads, layout.block_size, content), "[num_blocks, heads, block_size, content]"
    expected_order = _physical_order(layout)
    for name, tensor in kv_caches.items():
        if tuple(tensor.shape[1:]) != page:
            raise LayoutError(f"layer {name!r}: vLLM registered a KV tensor of shape {tuple(tensor.shape)}, not {axes} = "
                              f"[*, {', '.join(map(str, page))}] as layout {layout.layout_id} says")
        if _dtype_name(tensor.dtype) != layout.dtype and not (tensor.dtype.itemsize == 1 and layout.dtype.startswith("float8")):
            raise LayoutError(f"layer {name!r}: KV tensor of dtype {_dtype_name(tensor.dtype)}, layout {layout.layout_id} "
                              f"says {layout.dtype}")
        order = _stride_order(tensor)
        if expected_order is not None and order != [axis for axis in expected_order if axis in order]:
            raise LayoutError(f"layer {name!r}: the KV tensor's axes lie in memory in order {order} (strides "
                              f"{tuple(tensor.stride())}), not {expected_order} as page layout {layout.page_layout} says")


def _physical_order(layout: KVLayout) -> list[int] | None:
    """Logical axes of a per-layer view ([B, H, N, C]) from outermost to innermost in memory."""
    if layout.kv_format == "mla":
        return [0, 1, 2]  # [B, N, C], contiguous
    try:
        from vllm.v1.kv_cache_layout import KVCacheLayout
    except ImportError:  # older vLLM: per-layer views are contiguous [B, H, N, C]
        return [0, 1, 2, 3] if layout.page_layout == "LBHNC" else None
    try:
        return list(KVCacheLayout[layout.page_layout].layer_view_order)
    except KeyError:
        raise LayoutError(f"unknown KV cache layout {layout.page_layout!r}; vLLM's are "
                          f"{', '.join(m.name for m in KVCacheLayout)}") from None


def _stride_order(tensor: torch.Tensor) -> list[int]:
    """The tensor's axes of more than one element, outermost first (larger stride)."""
    axes = [axis for axis in range(tensor.dim()) if tensor.shape[axis] > 1]
    return sorted(axes, key=lambda axis: -tensor.stride(axis))


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
