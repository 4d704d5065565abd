"""Connector stats as vLLM collects them (``get_kv_connector_stats`` → its stats logger):
counters of lookups, loaded, failed and saved blocks since the last collection."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


@dataclass
class KVTierConnectorStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = Counter(self.data)
        merged.update(other.data or {})
        self.data = dict(merged)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class StatsInterval:
    """Lifetime counters plus the part of them not yet reported to vLLM."""

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()

    def take(self) -> KVTierConnectorStats | None:
        delta = self.total - self._reported
        self._reported = Counter(self.total)
        return KVTierConnectorStats(data=dict(delta)) if delta else None


def build_stats(data: dict[str, Any] | None) -> KVTierConnectorStats:
    return KVTierConnectorStats(data=dict(data or {}))
