"""Connector pieces that need no engine: settings validation, stats, worker metadata."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from connectors.vllm.metadata import KVTierWorkerMetadata  # noqa: E402
from connectors.vllm.settings import settings_from  # noqa: E402
from connectors.vllm.stats import StatsInterval, build_stats  # noqa: E402
from kvtier.errors import ConfigError  # noqa: E402
from tests.vllm.fakes import fake_attention_backend  # noqa: E402, F401 - a fixture, used by name


def test_settings_defaults_and_errors() -> None:
    settings = settings_from(None)
    assert settings.socket_path is None and settings.save_generated
    assert str(settings_from({"socket_path": "/run/kvtier/kvtier.sock"}).socket_path) == "/run/kvtier/kvtier.sock"
    with pytest.raises(ConfigError, match="timeout_s"):
        settings_from({"timeout_s": -1})
    with pytest.raises(ConfigError, match="sokcet_path"):
        settings_from({"sokcet_path": "/tmp/x"})  # a typo is named, not ignored


def test_stats_report_only_what_changed() -> None:
    interval = StatsInterval()
    assert interval.take() is None
    interval.total["loaded_blocks"] += 5
    first = interval.take()
    assert first.reduce() == {"loaded_blocks": 5}
    assert interval.take() is None  # nothing new
    interval.total["loaded_blocks"] += 2
    interval.total["saved_blocks"] += 1
    second = interval.take()
    merged = build_stats(first.data).aggregate(second)
    assert merged.reduce() == {"loaded_blocks": 7, "saved_blocks": 1}
    assert not merged.is_empty()
    merged.reset()
    assert merged.is_empty()


def test_worker_metadata_aggregates_committed_blocks_per_layout() -> None:
    a, b = KVTierWorkerMetadata({"l0": {b"x" * 16}}), KVTierWorkerMetadata({"l0": {b"y" * 16}, "l1": {b"x" * 16}})
    assert a.aggregate(b).committed == {"l0": {b"x" * 16, b"y" * 16}, "l1": {b"x" * 16}}
    assert a.committed == {"l0": {b"x" * 16}}  # the parts are left as they were


def test_a_block_is_announced_only_once_every_shard_holds_it(tmp_path, fake_attention_backend: str) -> None:
    """Tensor parallelism 2: ranks commit in different steps; the KV event waits for the last."""
    from types import SimpleNamespace

    from connectors.vllm.scheduler import SchedulerSide, _PendingEvent
    from tests.vllm.fakes import fake_configs

    scheduler = SchedulerSide(*fake_configs(tp_size=2), settings_from({"socket_path": str(tmp_path / "none.sock"),
                                                                         "model_revision": "w"}))
    try:
        rank0, rank1 = (layout.layout_id for layout in scheduler.layouts)
        block = b"h" * 16
        scheduler.unannounced[block] = _PendingEvent(123, None, list(range(16)), None)
        output = lambda committed: SimpleNamespace(kv_connector_worker_meta=KVTierWorkerMetadata(committed))  # noqa: E731
        scheduler.update_connector_output(output({rank0: {block}}))
        assert scheduler.take_events() == []  # rank 1 has not committed it yet
        scheduler.update_connector_output(output({rank0: {block}}))
        assert scheduler.take_events() == []
        scheduler.update_connector_output(output({rank1: {block}}))
        events = scheduler.take_events()
        assert [event.block_hashes for event in events] == [[123]] and block not in scheduler.unannounced
    finally:
        scheduler.shutdown()


def test_an_async_load_is_as_far_as_its_slowest_rank_got() -> None:
    from connectors.vllm.metadata import AsyncLoaded

    a = KVTierWorkerMetadata(async_loaded={"r1": AsyncLoaded(10, 0.0, 0.1), "r2": AsyncLoaded(4, 0.01, 0.1)})
    b = KVTierWorkerMetadata(async_loaded={"r1": AsyncLoaded(7, 0.02, 0.2), "r3": AsyncLoaded(1, 0.0, 0.1)})
    assert a.aggregate(b).async_loaded == {"r1": (7, 0.02, 0.2), "r2": (4, 0.01, 0.1), "r3": (1, 0.0, 0.1)}


def test_a_disabled_worker_still_reports_its_requests_finished(fake_attention_backend: str) -> None:
    """A worker that cannot save (here: never given a KV cache that matches its layout) must
    still tell the scheduler that requests' saves are done, or their blocks are never freed."""
    from connectors.vllm.metadata import KVTierConnectorMetadata, SaveSpec
    from connectors.vllm.worker import WorkerSide
    from tests.vllm.fakes import fake_configs

    worker = WorkerSide(*fake_configs(), settings_from({"model_revision": "test-weights"}))
    assert worker.layout is not None and not worker.enabled
    worker.wait_for_save(KVTierConnectorMetadata(saves=[SaveSpec("r1", (0, 1), (b"a" * 16, b"b" * 16))]))
    assert worker.get_finished({"r1"}) == ({"r1"}, None)
    assert worker.stats["save_skipped_blocks"] == 2
    worker.shutdown()


def test_an_idle_step_waits_for_a_load_in_flight_and_a_busy_one_never_does(fake_attention_backend: str) -> None:
    """Requests waiting for background loads leave the engine nothing to do; its empty steps
    wait (up to load_wait_s) for a load to end instead of spinning. A step with work never waits."""
    import threading

    from connectors.vllm.metadata import KVTierConnectorMetadata
    from connectors.vllm.worker import WorkerSide
    from kvtier.testing.daemon import wait_until
    from tests.vllm.fakes import fake_configs

    worker = WorkerSide(*fake_configs(), settings_from({"model_revision": "test-weights", "load_wait_s": 0.1}))
    release = threading.Event()

    def load(req_id: str) -> None:
        release.wait(30)
        with worker._lock:
            worker._recving_done.add(req_id)
            worker._load_ended()

    try:
        worker._submit_load(load, "busy")
        worker.start_load_kv(KVTierConnectorMetadata(scheduled_tokens=64))
        assert worker.get_finished(set()) == (None, None)  # the busy step went on
        release.set()
        assert wait_until(lambda: worker._loads_in_flight == 0, timeout=30)
        worker.start_load_kv(KVTierConnectorMetadata(scheduled_tokens=0))
        assert worker.get_finished(set()) == (None, {"busy"})
        release.clear()
        worker._submit_load(load, "idle")
        threading.Timer(0.01, release.set).start()
        worker.settings = worker.settings.model_copy(update={"load_wait_s": 30.0})  # however busy this machine is
        worker.start_load_kv(KVTierConnectorMetadata(scheduled_tokens=0))
        assert worker.get_finished(set()) == (None, {"idle"})
    finally:
        release.set()
        worker.shutdown()


def test_a_call_on_the_step_never_connects() -> None:
    """Connecting means gRPC calls (in embedded mode: starting a daemon); the step must not wait
    for that. A step call on a link that is not ready is a miss that starts a background connect."""
    import tempfile
    from pathlib import Path

    from collections import Counter

    from connectors.vllm.link import DaemonLink
    from kvtier.blocks import KVLayout
    from kvtier.testing.daemon import LocalDaemon, wait_until

    root = Path(tempfile.mkdtemp(prefix="kvl-", dir="/tmp"))  # short: Unix socket paths are limited
    daemon = LocalDaemon(root, env={"KVTIER_HOST_SLAB_SIZE": "1MiB"})
    daemon.start()
    layout = KVLayout(model="test/tiny", dtype="float16", num_layers=2, num_kv_heads=2, head_size=64, block_size=16)
    link = DaemonLink(settings_from({"socket_path": str(daemon.socket_path)}), [layout], client_id="step-test", role="test",
                      stats=Counter())
    try:
        calls: list[str] = []
        assert link.call(lambda client: calls.append("ran") or "ok", on_step=True) is None
        assert calls == [], "the step call must not wait for the connection"
        assert wait_until(lambda: link.call(lambda client: "ok", on_step=True) == "ok", timeout=30)
    finally:
        link.close()
        daemon.stop()
