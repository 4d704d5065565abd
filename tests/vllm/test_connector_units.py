"""Connector pieces that need no engine: settings validation, stats, worker metadata."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from connectors.vllm.metadata import KVTierWorkerMetadata  # noqa: E402
from connectors.vllm.settings import settings_from  # noqa: E402
from connectors.vllm.stats import StatsInterval, build_stats  # noqa: E402
from kvtier.errors import ConfigError  # noqa: E402


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


def test_worker_metadata_aggregates_committed_blocks() -> None:
    a, b = KVTierWorkerMetadata({b"x" * 16}), KVTierWorkerMetadata({b"y" * 16})
    assert a.aggregate(b).committed == {b"x" * 16, b"y" * 16}
