"""What the connector's layouts say about the engine, and what it does when it cannot say: the
weights are named by their fingerprint; pipeline parallelism, an unknown tensor-parallel rank or
weights it cannot find disable it (loads it was asked for are failed, so they are recomputed)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from connectors.vllm.identity import layout_for_rank  # noqa: E402
from connectors.vllm.settings import settings_from  # noqa: E402
from kvtier.errors import LayoutError  # noqa: E402
from tests.vllm.fakes import fake_attention_backend, fake_configs  # noqa: E402, F401 - the fixture is used by name
from tests.vllm.test_weights import model  # noqa: E402

pytestmark = pytest.mark.usefixtures("fake_attention_backend")


def test_the_layout_names_the_weights_it_was_computed_with(tmp_path) -> None:
    first, other = model(tmp_path, "a", seed=0), model(tmp_path, "b", seed=1)
    layout_a = layout_for_rank(*fake_configs(str(first)), tp_rank=0, model_id="llama")
    layout_b = layout_for_rank(*fake_configs(str(other)), tp_rank=0, model_id="llama")
    assert layout_a.model_revision.startswith("w1:") and layout_a.layout_id != layout_b.layout_id  # same name, other weights
    named = layout_for_rank(*fake_configs(str(first)), tp_rank=0, model_id="llama", model_revision="ft-2026-12")
    assert named.model_revision == "ft-2026-12"


def test_pipeline_parallelism_is_refused_with_a_clear_message() -> None:
    with pytest.raises(LayoutError, match="pipeline parallelism .*2 stages.*pipeline_parallel_size=1"):
        layout_for_rank(*fake_configs(pp_size=2), tp_rank=0, model_revision="w")


def test_a_worker_that_cannot_tell_its_rank_is_disabled_and_fails_the_loads_it_is_given() -> None:
    from connectors.vllm.estimates import LossBudget
    from connectors.vllm.metadata import KVTierConnectorMetadata, LoadSpec
    from connectors.vllm.worker import WorkerSide

    worker = WorkerSide(*fake_configs(tp_size=2), settings_from({"model_revision": "w"}))  # no vLLM parallel state here
    try:
        assert worker.layout is None and not worker.enabled
        worker.register_kv_caches({})
        assert not worker.enabled
        budget = LossBudget(blocks=1, recompute_block_s=0.01, expected_s=0.001, max_loss_fraction=0.05, min_loss_s=0.01)
        worker.start_load_kv(KVTierConnectorMetadata(loads=[LoadSpec("sync", (3, 4), (b"a" * 16, b"b" * 16)),
                                                            LoadSpec("async", (7,), (b"c" * 16,), budget=budget)]))
        assert worker.get_block_ids_with_load_errors() == {3, 4, 7}  # recomputed, never read from garbage
        assert worker.get_finished(set()) == (None, {"async"})
    finally:
        worker.shutdown()


def test_a_scheduler_that_cannot_find_the_weights_finds_nothing_and_saves_nothing(tmp_path) -> None:
    from connectors.vllm.disabled import DisabledScheduler
    from connectors.vllm.scheduler import SchedulerSide

    empty = tmp_path / "streamed"
    empty.mkdir()
    with pytest.raises(LayoutError, match="no weight files"):
        SchedulerSide(*fake_configs(str(empty)), settings_from({"socket_path": str(tmp_path / "none.sock")}))
    disabled = DisabledScheduler("no weight files")
    assert disabled.get_num_new_matched_tokens(object(), 0) == (0, False)
    assert disabled.request_finished(object(), [1, 2]) == (False, None)
    assert disabled.build_connector_meta(object()).loads == [] and disabled.take_events() == []


def test_the_attention_backend_and_kv_quantization_are_part_of_the_layout() -> None:
    import dataclasses

    from vllm.v1.kv_cache_interface import KVQuantMode

    from connectors.vllm.identity import check_registered

    vllm_config, kv_cache_config = fake_configs()
    flash = layout_for_rank(vllm_config, kv_cache_config, 0, model_revision="w")
    infer = layout_for_rank(vllm_config, kv_cache_config, 0, model_revision="w", attention_backend="FLASHINFER")
    assert dict(flash.extra) == {"attention_backend": "FLASH_ATTN", "kv_quant_mode": "NONE"}
    assert flash.layout_id != infer.layout_id
    vllm_config.cache_config.kv_cache_dtype_skip_layers = ["0"]
    assert layout_for_rank(vllm_config, kv_cache_config, 0, model_revision="w").layout_id != flash.layout_id
    vllm_config.cache_config.kv_cache_dtype_skip_layers = []
    group = kv_cache_config.kv_cache_groups[0]
    for mode in (KVQuantMode.INT8_PER_TOKEN_HEAD, KVQuantMode.FP8_PER_TOKEN_HEAD):  # scales inside the pages
        group.kv_cache_spec = dataclasses.replace(group.kv_cache_spec, kv_quant_mode=mode)
        with pytest.raises(LayoutError, match=mode.name):
            layout_for_rank(vllm_config, kv_cache_config, 0, model_revision="w")
    caches = vllm_kv_caches("LBHNC", layers=1)
    layout = _layout(num_layers=1, extra=flash.extra)
    check_registered(caches, layout, {"FLASH_ATTN"})
    check_registered(caches, layout, None)  # layers not visible (no engine): only the tensors are checked
    with pytest.raises(LayoutError, match="--attention-backend FLASHINFER"):
        check_registered(caches, layout, {"FLASHINFER"})  # the layers use another backend than the id says


def vllm_kv_caches(order_name: str, layers: int = 3, blocks: int = 5, heads: int = 2, block_size: int = 16, content: int = 128,
                   dtype=None) -> dict[str, object]:
    """Per-layer KV views as vLLM 0.32/0.33 makes them: one allocation in the physical order
    ``order_name`` (vllm/v1/kv_cache_layout.py), viewed as logical [L, B, H, N, C] and split by layer."""
    import torch
    from vllm.v1.kv_cache_layout import KVCacheLayout

    order = KVCacheLayout[order_name].stride_order
    logical = (layers, blocks, heads, block_size, content)
    physical = torch.zeros([logical[axis] for axis in order], dtype=dtype or torch.float16)
    inverse = [order.index(axis) for axis in range(5)]
    view = physical.permute(inverse)
    assert tuple(view.shape) == logical
    return {f"model.layers.{layer}.self_attn.attn": view[layer] for layer in range(layers)}


def _layout(page_layout: str = "LBHNC", **changes):
    from kvtier.blocks import KVLayout

    fields = {"model": "m", "model_revision": "w", "dtype": "float16", "num_layers": 3, "num_kv_heads": 2, "head_size": 64,
              "block_size": 16, "page_layout": page_layout}
    return KVLayout(**{**fields, **changes})


ORDERS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")


@pytest.mark.parametrize("order", ORDERS)
def test_tensors_shaped_like_vllms_pass_only_for_the_layout_they_are_in(order: str) -> None:
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from connectors.vllm.identity import check_registered

    caches = vllm_kv_caches(order)
    check_registered(caches, _layout(order))
    for claimed in ORDERS:
        same_bytes = KVCacheLayout[claimed].layer_view_order == KVCacheLayout[order].layer_view_order
        if not same_bytes:
            with pytest.raises(LayoutError, match="lie in memory in order"):
                check_registered(caches, _layout(claimed))


def test_a_shape_or_dtype_other_than_the_layouts_is_refused() -> None:
    import torch

    from connectors.vllm.identity import check_registered

    with pytest.raises(LayoutError, match=r"shape \(5, 4, 16, 128\)"):
        check_registered(vllm_kv_caches("LBHNC", heads=4), _layout())
    with pytest.raises(LayoutError, match="dtype bfloat16"):
        check_registered(vllm_kv_caches("LBHNC", dtype=torch.bfloat16), _layout())
    check_registered(vllm_kv_caches("LBHNC", dtype=torch.uint8), _layout(dtype="float8_e4m3fn"))  # fp8 caches held as bytes
    with pytest.raises(LayoutError, match="no KV cache tensors"):
        check_registered({}, _layout())


def test_heads_and_tokens_of_equal_count_are_still_told_apart() -> None:
    """16 heads and 16 tokens a block: the sizes match in either order, the strides do not."""
    from connectors.vllm.identity import check_registered

    caches = vllm_kv_caches("LBNHC", heads=16)
    check_registered(caches, _layout("LBNHC", num_kv_heads=16))
    with pytest.raises(LayoutError, match="lie in memory"):
        check_registered(caches, _layout("LBHNC", num_kv_heads=16))


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None

if given is not None:
    @settings(max_examples=60, deadline=None)
    @given(order=st.sampled_from(ORDERS), claimed=st.sampled_from(ORDERS), heads=st.integers(1, 4),
           block_size=st.sampled_from([1, 2, 16]), head_size=st.sampled_from([8, 64]), blocks=st.integers(2, 4),
           dtype=st.sampled_from(["float16", "bfloat16", "float32"]), claimed_dtype=st.sampled_from(["float16", "bfloat16", "float32"]))
    def test_the_check_passes_exactly_when_the_bytes_are_read_the_same(order, claimed, heads, block_size, head_size, blocks, dtype,
                                                                        claimed_dtype) -> None:
        """Random shapes, orders and dtypes: accepted iff dtype and shape agree and every axis of
        more than one element lies in memory where the claimed layout puts it."""
        import torch
        from vllm.v1.kv_cache_layout import KVCacheLayout

        from connectors.vllm.identity import check_registered

        caches = vllm_kv_caches(order, blocks=blocks, heads=heads, block_size=block_size, content=2 * head_size,
                                dtype=getattr(torch, dtype))
        layout = _layout(claimed, num_kv_heads=heads, block_size=block_size, head_size=head_size, dtype=claimed_dtype)
        sizes = (blocks, heads, block_size, 2 * head_size)
        def placed(name: str) -> list[int]:
            return [axis for axis in KVCacheLayout[name].layer_view_order if sizes[axis] > 1]
        same = dtype == claimed_dtype and placed(order) == placed(claimed)
        try:
            check_registered(caches, layout)
            accepted = True
        except LayoutError:
            accepted = False
        assert accepted == same


def test_ranks_with_identical_kv_share_one_layout_so_blocks_are_stored_once(tmp_path) -> None:
    from connectors.vllm.scheduler import SchedulerSide

    ids = [layout_for_rank(*fake_configs(tp_size=4, replicas=2), tp_rank=rank, model_revision="w").layout_id for rank in range(4)]
    assert ids[0] == ids[1] != ids[2] == ids[3]  # vLLM: consecutive ranks 0-1 and 2-3 hold the same KV heads
    mla = {layout_for_rank(*fake_configs(tp_size=4, use_mla=True), tp_rank=rank, model_revision="w").layout_id for rank in range(4)}
    assert len(mla) == 1  # an MLA cache is the same on every rank
    plain = {layout_for_rank(*fake_configs(tp_size=4), tp_rank=rank, model_revision="w").layout_id for rank in range(4)}
    assert len(plain) == 4
    scheduler = SchedulerSide(*fake_configs(tp_size=4, replicas=2),
                              settings_from({"socket_path": str(tmp_path / "none.sock"), "model_revision": "w"}))
    try:
        assert [layout.tp_rank for layout in scheduler.layouts] == [0, 1]  # looked up, leased and announced once per shard
    finally:
        scheduler.shutdown()


def test_blocks_round_trip_bitwise_through_a_daemon_in_their_layout_and_miss_in_any_other(tmp_path) -> None:
    """Per physical order: pages gathered from vLLM-shaped tensors, stored in a real daemon under
    the layout the check accepted, scattered into a fresh cache of the same order come back
    bit for bit; looked up under any other order's layout they are misses. Orders whose pages are
    not one run of memory are refused (the worker then stays off)."""
    import tempfile
    from pathlib import Path

    import torch

    from connectors.vllm.identity import check_registered
    from kvtier.blocks import hash_prompt
    from kvtier.client import DaemonClient
    from kvtier.copy import describe_paged_kv, make_page_copier
    from kvtier.errors import CopyError
    from kvtier.testing.daemon import LocalDaemon

    root = Path(tempfile.mkdtemp(prefix="kvl-", dir="/tmp"))  # a short path: Unix socket names are limited
    daemon = LocalDaemon(root, host_capacity="32MiB")
    daemon.start()
    try:
        with DaemonClient(daemon.socket_path) as client, make_page_copier(torch.device("cpu")) as copier:
            for index, order in enumerate(ORDERS):
                caches = vllm_kv_caches(order)
                for view in caches.values():
                    view.copy_(torch.randn(view.shape, generator=torch.Generator().manual_seed(index)).to(view.dtype))
                layout = _layout(order)
                check_registered(caches, layout)
                if order in ("LHBNC", "BHLNC"):  # a block's heads lie apart (between other blocks or layers): not copied
                    with pytest.raises(CopyError, match="not one dense run"):
                        describe_paged_kv(caches)
                    continue
                paged = describe_paged_kv(caches)
                assert paged.slot_nbytes == layout.block_nbytes
                host = torch.empty(2 * paged.slot_nbytes, dtype=torch.uint8)
                copier.gather(paged, [1, 3], host, [0, paged.slot_nbytes]).wait()
                hashes = hash_prompt(list(range(100 * index, 100 * index + 32)), 16)
                client.register_layout(layout)
                client.write_blocks(layout.layout_id, {h: host[i * paged.slot_nbytes:(i + 1) * paged.slot_nbytes].numpy().tobytes()
                                                       for i, h in enumerate(hashes)})
                fresh = vllm_kv_caches(order)
                back = torch.frombuffer(bytearray(b"".join(client.read_blocks(layout.layout_id, hashes))), dtype=torch.uint8)
                copier.scatter(describe_paged_kv(fresh), [0, 2], back, [0, paged.slot_nbytes]).wait()
                for name, view in caches.items():
                    assert torch.equal(fresh[name][0].view(torch.uint8), view[1].view(torch.uint8))
                    assert torch.equal(fresh[name][2].view(torch.uint8), view[3].view(torch.uint8))
                for other in ORDERS:
                    if other != order:
                        client.register_layout(_layout(other))
                        assert client.lookup(_layout(other).layout_id, hashes) == []
    finally:
        daemon.stop()
        __import__("shutil").rmtree(root, ignore_errors=True)
