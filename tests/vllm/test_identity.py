"""What the connector's layouts say about the engine, and what it does when it cannot say: the
weights are named by their fingerprint; pipeline parallelism, an unknown tensor-parallel rank or
weights it cannot find disable it (loads it was asked for are failed, so they are recomputed)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from connectors.vllm.identity import layout_for_rank  # noqa: E402
from connectors.vllm.settings import settings_from  # noqa: E402
from kvtier.errors import LayoutError  # noqa: E402
from tests.vllm.fakes import fake_configs  # noqa: E402
from tests.vllm.test_weights import model  # noqa: E402


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
