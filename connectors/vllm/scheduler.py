"""The scheduler half of KVTierConnector: what to load and what to save, decided per step.

It runs on vLLM's scheduler loop, so it does as little as possible there: one batched Lookup
per new request, started on a background thread when the request arrives (the scheduler is told
"ask again" while it runs, and gets a miss if it takes longer than ``timeout_s``; the link
answers "miss" at once while the daemon is unreachable), and bookkeeping. All bytes move in the
workers.

Per request it keeps the kvtier block hashes of its tokens (extended as tokens are generated),
its engine block ids, which blocks it loaded, and how far saving has got. A block is saved once
it is full and computed; saves run asynchronously in the workers, so a finished request whose
blocks are still being saved is freed only after the workers report it (``delay_free``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from connectors.vllm import step_timer
from connectors.vllm.identity import hash_extras, layout_for_rank
from connectors.vllm.link import DaemonLink
from connectors.vllm.metadata import KVTierConnectorMetadata, KVTierWorkerMetadata, LoadSpec, SaveSpec
from connectors.vllm.settings import ConnectorSettings
from connectors.vllm.stats import StatsInterval
from kvtier.blocks import PrefixHasher

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class _RequestState:
    request: Request
    hasher: PrefixHasher
    pending_lookup: Future[list[str] | None] | None = None  # started at arrival, off the step
    lookup_started: float = 0.0
    block_ids: list[int] = field(default_factory=list)
    lookup: tuple[int, int, bool] | None = None  # (first block, blocks found, any below host)
    loaded: range = range(0)
    saved_upto: int = 0  # blocks before this were saved (or loaded) already
    has_saves: bool = False


@dataclass
class _PendingEvent:
    vllm_hash: Any
    parent_vllm_hash: Any
    token_ids: list[int]
    lora_name: str | None


class SchedulerSide:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.layouts = [layout_for_rank(vllm_config, kv_cache_config, rank, settings.model_id) for rank in range(tp_size)]
        self.link = DaemonLink(settings, self.layouts, client_id="vllm-scheduler")
        self.link.connect()
        self._lookups = ThreadPoolExecutor(2, thread_name_prefix="kvtier-lookup")
        self._engine_idle = True
        self.requests: dict[str, _RequestState] = {}
        self.pending_loads: list[LoadSpec] = []
        self.unannounced: dict[bytes, _PendingEvent] = {}
        self.events: list[Any] = []
        self.interval = StatsInterval()
        self.stats = self.interval.total  # lookups, lookup_hit_tokens, lookup_unavailable, load_requests
        self.announced: OrderedDict[bytes, None] = OrderedDict()  # blocks already in a STORAGE event

    # ---- lookups -----------------------------------------------------------------------------

    def _state(self, request: Request) -> _RequestState:
        state = self.requests.get(request.request_id)
        if state is None:
            state = _RequestState(request, PrefixHasher(self.block_size, hash_extras(request)))
            self.requests[request.request_id] = state
        return state

    def on_new_request(self, request: Request) -> None:
        self._start_lookup(self._state(request))

    def _start_lookup(self, state: _RequestState) -> None:
        """Look the prompt up on a background thread, so the scheduler step never waits for it."""
        tokens = state.request.all_token_ids
        hashes = state.hasher.update(tokens)
        loadable = hashes[: (len(tokens) - 1) // self.block_size]  # the last token is always computed
        state.lookup_started = time.monotonic()
        if loadable:
            state.pending_lookup = self._lookups.submit(self._lookup, list(loadable))
        else:  # a prompt shorter than two blocks: nothing to look up
            state.pending_lookup = Future()
            state.pending_lookup.set_result([])

    def _lookup(self, hashes: list[bytes]) -> list[str] | None:
        def lookup_every_rank(client) -> list[str]:
            found: list[str] | None = None
            for layout in self.layouts:  # a block is usable only if every rank holds it
                tiers = client.lookup(layout.layout_id, hashes)
                found = tiers if found is None else [max(a, b, key=_tier_rank) for a, b in zip(found, tiers)]
            return found or []

        return self.link.call(lookup_every_rank)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Answer from the lookup started at arrival; None ("ask again next step") while it runs."""
        state = self._state(request)
        state.lookup = None
        if state.pending_lookup is None:
            self._start_lookup(state)  # e.g. a request resumed after preemption
        if not state.pending_lookup.done():
            # Wait a little only while the engine is idle (the last step scheduled nothing): the
            # wait then delays no one and spares the request a spin of empty steps. A busy
            # engine never waits; the request is asked about again next step.
            waited = time.perf_counter()
            try:
                state.pending_lookup.result(timeout=self.settings.lookup_wait_s if self._engine_idle else 0)
            except FutureTimeout:
                pass
            finally:
                if self._engine_idle:
                    step_timer.record_idle_wait(time.perf_counter() - waited)
            if not state.pending_lookup.done():
                if time.monotonic() - state.lookup_started < self.settings.timeout_s:
                    return None, False
                self.stats["lookup_unavailable"] += 1
                return 0, False  # too slow: compute rather than wait
        tiers = state.pending_lookup.result()
        self.stats["lookups"] += 1
        start = num_computed_tokens // self.block_size
        if tiers is None:
            self.stats["lookup_unavailable"] += 1
            return 0, False
        if len(tiers) <= start:
            return 0, False
        is_async = any(tier != "host" for tier in tiers[start:])
        state.lookup = (start, len(tiers) - start, is_async)
        self._announce_stored(request, tiers, state.hasher.hashes)
        self.stats["lookup_hit_tokens"] += (len(tiers) - start) * self.block_size
        return (len(tiers) - start) * self.block_size, is_async

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        state = self._state(request)
        lookup, state.lookup = state.lookup, None
        if num_external_tokens <= 0 or lookup is None:
            if num_external_tokens <= 0:
                state.pending_lookup = None  # a resumed request looks up afresh
            return
        start, found, is_async = lookup
        state.pending_lookup = None
        count = min(found, num_external_tokens // self.block_size)
        block_ids = blocks.get_block_ids()[0]
        hashes = state.hasher.hashes
        self.pending_loads.append(
            LoadSpec(request.request_id, tuple(block_ids[start : start + count]), tuple(hashes[start : start + count]), is_async)
        )
        state.loaded = range(start, start + count)
        self.stats["load_requests"] += 1

    # ---- per-step metadata -------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVTierConnectorMetadata:
        meta = KVTierConnectorMetadata(loads=self.pending_loads)
        self.pending_loads = []
        self._engine_idle = scheduler_output.total_num_scheduled_tokens == 0
        scheduled = scheduler_output.num_scheduled_tokens
        speculative = scheduler_output.scheduled_spec_decode_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            computed = new.num_computed_tokens + scheduled.get(new.req_id, 0) - len(speculative.get(new.req_id, ()))
            self._plan_save(new.req_id, state, computed, meta)
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            state = self.requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[index]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.block_ids.extend(new_ids[0])
            computed = cached.num_computed_tokens[index] + scheduled.get(req_id, 0) - len(speculative.get(req_id, ()))
            self._plan_save(req_id, state, computed, meta)
        for req_id in scheduler_output.preempted_req_ids or ():
            meta.preempted_req_ids.add(req_id)
            state = self.requests.get(req_id)
            if state is not None:
                state.block_ids = []
        return meta

    def _plan_save(self, req_id: str, state: _RequestState, computed: int, meta: KVTierConnectorMetadata) -> None:
        request = state.request
        full = min(computed // self.block_size, len(state.block_ids))
        if not self.settings.save_generated:
            full = min(full, request.num_prompt_tokens // self.block_size)
        if full <= state.saved_upto:
            return
        hashes = state.hasher.update(request.all_token_ids[: full * self.block_size])
        indexes = [i for i in range(state.saved_upto, full) if i not in state.loaded]
        state.saved_upto = full
        if not indexes:
            return
        meta.saves.append(SaveSpec(req_id, tuple(state.block_ids[i] for i in indexes), tuple(hashes[i] for i in indexes)))
        state.has_saves = True
        self._remember_for_events(request, indexes, hashes)

    # ---- lifecycle and events ----------------------------------------------------------------

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        state = self.requests.pop(request.request_id, None)
        # Saves run in the workers after the step; keep the blocks until they report them done.
        return (state is not None and state.has_saves), None

    def _remember_for_events(self, request: Request, indexes: list[int], hashes: list[bytes]) -> None:
        vllm_hashes = getattr(request, "block_hashes", None) or []
        lora = getattr(request, "lora_request", None)
        for i in indexes:
            if i < len(vllm_hashes):
                tokens = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
                parent = _external(vllm_hashes[i - 1]) if i > 0 else None
                self.unannounced[hashes[i]] = _PendingEvent(_external(vllm_hashes[i]), parent, list(tokens), getattr(lora, "lora_name", None))
        while len(self.unannounced) > _MAX_UNANNOUNCED:  # saves that never committed (daemon down)
            del self.unannounced[next(iter(self.unannounced))]

    def _announce_stored(self, request: Request, tiers: list[str], hashes: list[bytes]) -> None:
        """KV events (medium STORAGE) for blocks a lookup found below host memory, once each."""
        vllm_hashes = getattr(request, "block_hashes", None) or []
        from vllm.distributed.kv_events import MEDIUM_STORAGE, BlockStored

        lora = getattr(request, "lora_request", None)
        for i, tier in enumerate(tiers):
            if tier == "host" or i >= len(vllm_hashes) or hashes[i] in self.announced:
                continue
            self.announced[hashes[i]] = None
            if len(self.announced) > _MAX_UNANNOUNCED:
                self.announced.popitem(last=False)
            self.events.append(BlockStored(
                block_hashes=[_external(vllm_hashes[i])], parent_block_hash=_external(vllm_hashes[i - 1]) if i else None,
                token_ids=list(request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]),
                block_size=self.block_size, lora_id=None, medium=MEDIUM_STORAGE, lora_name=getattr(lora, "lora_name", None),
            ))

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        meta = getattr(output, "kv_connector_worker_meta", None)
        if not isinstance(meta, KVTierWorkerMetadata) or not meta.committed:
            return
        from vllm.distributed.kv_events import MEDIUM_CPU, BlockStored

        for block_hash in meta.committed:
            pending = self.unannounced.pop(block_hash, None)
            if pending is None:
                continue
            self.events.append(BlockStored(
                block_hashes=[pending.vllm_hash], parent_block_hash=pending.parent_vllm_hash, token_ids=pending.token_ids,
                block_size=self.block_size, lora_id=None, medium=MEDIUM_CPU, lora_name=pending.lora_name,
            ))

    def take_events(self) -> list[Any]:
        events, self.events = self.events, []
        return events

    def shutdown(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)
        self.link.close()


_TIER_ORDER = {"host": 0, "disk": 1, "s3": 2}
_MAX_UNANNOUNCED = 1 << 16


def _external(block_hash: Any) -> Any:
    """vLLM's block hash as its own events publish it (an int unless configured otherwise)."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    return maybe_convert_block_hash(block_hash)


def _tier_rank(tier: str) -> int:
    return _TIER_ORDER.get(tier, len(_TIER_ORDER))
