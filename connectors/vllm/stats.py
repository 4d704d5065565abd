"""Connector stats as vLLM collects them (``get_kv_connector_stats`` → its stats logger):
counters of lookups, loaded, failed and saved blocks since the last collection. The same
lifetime counters go to the daemon every few seconds (``kvtier stats`` shows them), the
:data:`FAILURE_COUNTERS` among them as failures."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


# Counters of things that went wrong: each is a block or request kvtier could have served and did
# not (it was recomputed), or a save that was lost. Declined loads and preemption cuts are policy,
# not failures.
FAILURE_COUNTERS = frozenset({
    "lookup_unavailable",  # the daemon could not be asked: the prompt was computed
    "lookup_late",  # the lookup missed the scheduler's wait
    "load_corrupt",  # a block failed its checksum on load
    "load_failed_blocks",  # blocks vLLM was told could not be loaded (recomputed)
    "load_given_up",  # a fetch from disk/S3 stopped by its loss budget
    "load_stale_arena",  # a load named the arena of a daemon that has since restarted
    "save_failed",  # a save job that raised
    "save_unavailable_blocks",  # blocks not saved: the daemon was unavailable
    "save_no_space_blocks",  # blocks not saved: host memory full of pinned blocks
    "daemon_unreachable",  # the link lost the daemon (then backed off)
    "daemon_timeouts",  # a call missed its deadline
    "daemon_refused",  # the daemon refused a call
})


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
