"""The scheduler half of a connector that cannot say what its KV blocks are (weights it cannot
find, a parallel layout kvtier does not support): it finds nothing and saves nothing, so the
engine runs as if without kvtier. The error that disabled it was logged once, naming why."""

from __future__ import annotations

from typing import Any

from connectors.vllm.metadata import KVTierConnectorMetadata
from connectors.vllm.stats import StatsInterval


class DisabledScheduler:
    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.interval = StatsInterval()

    def on_new_request(self, request: Any) -> None:
        return None

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: Any) -> KVTierConnectorMetadata:
        return KVTierConnectorMetadata(scheduled_tokens=getattr(scheduler_output, "total_num_scheduled_tokens", 0))

    def update_connector_output(self, connector_output: Any) -> None:
        return None

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, None]:
        return False, None  # nothing saved: the blocks are free at once

    def take_events(self) -> list[Any]:
        return []

    def shutdown(self) -> None:
        return None


__all__ = ["DisabledScheduler"]
