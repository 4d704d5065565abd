"""The scheduler half of KVTierConnector: what to load and what to save, decided per step.

It runs on vLLM's scheduler loop, so it does as little as possible there and never calls the
daemon on it:

- **Lookups** start on a background thread when a request arrives: one batched Lookup per rank's
  layout and, for the leading run held in host memory, an Acquire that leases those blocks (they
  cannot be evicted or moved until released). Blocks below host memory that are expected to
  arrive within half the lookup's allowance (a few MiB from disk) are promoted by the lookup
  itself and leased with the host run (one Prefetch), so they too load synchronously, without the
  engine-step hand-offs of an asynchronous load. The scheduler is told "ask again" while the lookup
  runs, for at most the request's loss allowance (``max_loss_fraction`` of its measured recompute
  time); a later answer is a miss, and a daemon that misses its call deadline is skipped until it
  answers again (``connectors.vllm.link``).
- **Loads.** Blocks leased in host memory are loaded synchronously: the step's metadata carries
  their arena offsets and checksums, and the workers copy them before the forward without a
  daemon call. Blocks on disk, S3 or a peer are loaded asynchronously, and only when the measured
  tier bandwidth makes that clearly faster than recomputing them (``connectors.vllm.estimates``);
  the request then waits while a worker thread has them promoted, within a :class:`LossBudget`.
- **Leases** are released (on a background thread) once the workers report the blocks copied, or
  when the request turns out not to load them, or finishes.
- **Saves**: a block is saved once it is full and computed; saves run asynchronously in the
  workers, so a finished request whose blocks are still being copied out is freed only after the
  workers report it (``delay_free``).

Per request it keeps the kvtier block hashes of its tokens (extended as tokens are generated),
its engine block ids, which blocks it loaded, and how far saving has got.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from connectors.vllm import step_timer
from connectors.vllm.estimates import Estimates, LossBudget
from connectors.vllm.identity import hash_extras, layout_for_rank
from connectors.vllm.link import DaemonLink
from connectors.vllm.metadata import AsyncLoaded, KVTierConnectorMetadata, KVTierWorkerMetadata, LeasedSlots, LoadSpec, SaveSpec
from connectors.vllm.settings import ConnectorSettings
from connectors.vllm.stats import StatsInterval
from kvtier.blocks import PrefixHasher
from kvtier.chain.promotion import FetchBudget
from kvtier.client import DaemonClient, LeaseGrant
from kvtier.errors import LeaseError

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger: its handler, format and VLLM_LOGGING_LEVEL


@dataclass(slots=True)
class _Lookup:
    """What the daemon holds of a request's prompt, as found by its background lookup."""

    tiers: list[str]  # per leading block: the deepest tier any rank holds it in
    grants: dict[str, LeaseGrant]  # layout id -> lease on the leading run in host memory
    daemon_instance: str
    host_run: int  # leading blocks leased for every rank
    at: float = field(default_factory=time.monotonic)

    def lease_ids(self) -> list[int]:
        return [grant.lease_id for grant in self.grants.values()]


@dataclass(slots=True)
class _Decision:
    start: int  # first block to load
    count: int
    budget: LossBudget | None  # None: synchronous (host memory, leased)
    tier: str


@dataclass
class _RequestState:
    request: Request
    hasher: PrefixHasher  # extended by the lookup thread and the scheduler, under hash_lock
    hash_lock: threading.Lock = field(default_factory=threading.Lock)
    pending_lookup: Future[_Lookup | None] | None = None  # started at arrival, off the step
    lookup_started: float = 0.0
    decision: _Decision | None = None
    block_ids: list[int] = field(default_factory=list)
    loaded: range = range(0)
    saved_upto: int = 0  # blocks before this were saved (or loaded) already
    held_on_gpu: int = 0  # leading blocks in vLLM's prefix cache that kvtier holds too: never saved again
    has_saves: bool = False
    waited_async: bool = False  # it waited for an asynchronous load once: never again (host hits only)


@dataclass
class _PendingEvent:
    vllm_hash: Any
    parent_vllm_hash: Any
    token_ids: list[int]
    lora_name: str | None
    held_by: set[str] = field(default_factory=set)  # layouts whose ranks reported the block held


class SchedulerSide:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        per_rank = [layout_for_rank(vllm_config, kv_cache_config, rank, settings.model_id, settings.model_revision)
                    for rank in range(tp_size)]
        self.layouts = list({layout.layout_id: layout for layout in per_rank}.values())  # one per KV shard
        self.block_nbytes = sum(layout.block_nbytes for layout in self.layouts)
        self.host_loads_in_background = settings.host_loads != "on_step"
        self.interval = StatsInterval()
        self.stats = self.interval.total
        self.link = DaemonLink(settings, self.layouts, client_id=f"vllm-scheduler-{os.getpid()}", role="vllm-scheduler",
                               stats=self.stats)
        self.estimates = Estimates(min_prefill_tokens=2 * self.block_size)
        self.link.connect()
        self.estimates.seed_prefill(self.link.prefill_hint)  # what an earlier engine of this layout measured
        self._reported_rate_at = 0.0
        self._lookups = ThreadPoolExecutor(2, thread_name_prefix="kvtier-lookup")
        self._releaser = ThreadPoolExecutor(1, thread_name_prefix="kvtier-release")
        self._lease_ttl_s = 30.0  # the daemon's default; refreshed from grants
        self._engine_idle = True
        self.requests: dict[str, _RequestState] = {}
        self.pending_loads: list[LoadSpec] = []
        self.unannounced: dict[bytes, _PendingEvent] = {}
        self._descriptions: list[tuple[bytes, bytes | None, list[int], str | None]] = []  # for the daemon's vLLM events
        self.events: list[Any] = []
        self.announced: OrderedDict[bytes, None] = OrderedDict()  # blocks already in a STORAGE event
        self.slowest_lookup_s = 0.0
        self._tried_at: dict[str, float] = {}  # tier -> when a load from it was last tried
        self._async_started: dict[str, tuple[float, str]] = {}  # request -> (when, tier) of its asynchronous load
        self._lookup_reads: list[tuple[str, int, float]] = []  # (tier, bytes, s) promoted by lookups: estimates, on the scheduler thread
        self._async_loaded: dict[str, AsyncLoaded] = {}  # request -> how its asynchronous load went

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
        """Hash the prompt and look it up on a background thread, so the scheduler step waits
        for neither (hashing a long prompt takes milliseconds)."""
        tokens = len(state.request.all_token_ids)
        loadable = (tokens - 1) // self.block_size  # the last token is always computed
        state.lookup_started = time.monotonic()
        if loadable and self.link.available:
            state.pending_lookup = self._lookups.submit(self._hash_and_lookup, state, loadable, self._lookup_allowance_s(tokens))
        else:  # a prompt shorter than two blocks (nothing to load), or a daemon that is late or unreachable
            state.pending_lookup = Future()
            state.pending_lookup.set_result(_Lookup([], {}, "", 0) if not loadable else None)

    def _hash_and_lookup(self, state: _RequestState, blocks: int, allowance_s: float) -> _Lookup | None:
        """On a lookup thread: the kvtier hashes of the prompt's first ``blocks`` blocks (a prefix
        that never changes, sliced in one step while the scheduler may append tokens), then the lookup."""
        with state.hash_lock:
            hashes = list(state.hasher.update(state.request.all_token_ids[: blocks * self.block_size])[:blocks])
        return self._lookup(hashes, allowance_s)

    def _lookup(self, hashes: list[bytes], allowance_s: float) -> _Lookup | None:
        def lookup_and_lease(client: DaemonClient) -> _Lookup:
            found: list[str] | None = None
            for layout in self.layouts:  # a block is usable only if every rank holds it
                tiers = client.lookup(layout.layout_id, hashes, refresh=True)  # the prompt is about to use them
                found = tiers if found is None else [max(a, b, key=_tier_rank) for a, b in zip(found, tiers)]
            tiers = found or []
            host_run = next((i for i, tier in enumerate(tiers) if tier != "host"), len(tiers))
            promote = self._promotion_in_lookup(tiers, host_run, allowance_s)
            run = len(tiers) if promote else host_run
            grants: dict[str, LeaseGrant] = {}
            started = time.perf_counter()
            try:
                for layout in self.layouts if run else ():
                    if promote:
                        grant = client.fetch(layout.layout_id, hashes[:run], promote, max_wait_s=promote.allowance_s).lease
                    else:
                        grant = client.acquire(layout.layout_id, hashes[:run])
                    if grant is None:  # nothing arrived in time
                        run = 0
                        break
                    grants[layout.layout_id] = grant
                    run = min(run, len(grant.blocks))
            except BaseException:
                self._release([grant.lease_id for grant in grants.values()])
                raise
            if promote:
                deepest = max(tiers[host_run:], key=_tier_rank)
                self._lookup_reads.append((deepest, max(run - host_run, 1) * self.block_nbytes, time.perf_counter() - started))
                self.stats["lookup_promoted_blocks"] += max(run - host_run, 0)
                tiers = ["host"] * run  # loaded synchronously; the rest is computed (no second wait)
            return _Lookup(tiers, grants, client.daemon_instance or "", run)

        if not self.link.available:  # went late while this waited in the queue
            return None
        started = time.perf_counter()
        try:
            return self.link.call(lookup_and_lease)
        finally:
            took = time.perf_counter() - started
            self.stats["lookup_us"] += int(took * 1e6)
            self.slowest_lookup_s = max(self.slowest_lookup_s, took)

    def _promotion_in_lookup(self, tiers: list[str], host_run: int, allowance_s: float) -> FetchBudget | None:
        """Whether the lookup should bring the blocks below host memory in itself, and under what
        budget: when they are expected to arrive within half the lookup's own allowance (a few
        MiB from disk), promoting them now and loading them synchronously beats an asynchronous
        load, whose hand-offs between engine steps cost more than the reads. The daemon waits at
        most that half; what arrived is leased, the rest is computed."""
        block_s = self.estimates.recompute_s(self.block_size)
        if host_run >= len(tiers) or block_s is None:
            return None
        wait_s = allowance_s / 2
        if self.estimates.read_s(self._bytes_by_tier(tiers[host_run:])) > wait_s:
            return None
        return FetchBudget(block_s, wait_s)

    def _bytes_by_tier(self, tiers: list[str]) -> dict[str, int]:
        """The bytes these blocks (one tier each) take, per tier."""
        return {tier: count * self.block_nbytes for tier, count in Counter(tiers).items()}

    def _lookup_allowance_s(self, tokens: int) -> float:
        """How long a request of ``tokens`` prompt tokens may wait for its lookup."""
        recompute = self.estimates.recompute_s(tokens)
        if recompute is None:
            allowance = 2 * self.settings.min_loss_s  # nothing measured here or by an earlier engine yet
        else:
            allowance = max(self.settings.max_loss_fraction * recompute, self.settings.min_loss_s)
        return min(allowance, self.settings.timeout_s)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Answer from the lookup started at arrival; None ("ask again next step") while it runs."""
        state = self._state(request)
        state.decision = None
        if state.pending_lookup is None:
            self._start_lookup(state)  # e.g. a request resumed after preemption
        pending = state.pending_lookup
        if not pending.done():
            # Wait a little only while the engine is idle (the last step scheduled nothing): the
            # wait then delays no one and spares the request a spin of empty steps. A busy
            # engine never waits; the request is asked about again next step.
            allowance = self._lookup_allowance_s(len(request.all_token_ids))
            elapsed = time.monotonic() - state.lookup_started
            if self._engine_idle and elapsed < allowance:
                waited = time.perf_counter()
                try:
                    pending.result(timeout=min(self.settings.lookup_wait_s, allowance - elapsed))
                except FutureTimeout:
                    pass
                finally:
                    step_timer.record_idle_wait(time.perf_counter() - waited)
            if not pending.done():
                if time.monotonic() - state.lookup_started < allowance:
                    return None, False
                self.stats["lookup_late"] += 1
                self._abandon(state)
                return 0, False  # too slow: compute rather than wait
        found = pending.result()
        self.stats["lookups"] += 1
        if found is None:
            self.stats["lookup_unavailable"] += 1
            return 0, False
        if time.monotonic() - found.at > self._lease_ttl_s / 2:  # waited long in the queue: look again
            self._abandon(state)
            self._start_lookup(state)
            return None, False
        start = num_computed_tokens // self.block_size
        # Blocks vLLM's prefix cache already holds are not loaded; those kvtier holds as well (the
        # lookup refreshed them in its eviction order) are not saved again either.
        state.held_on_gpu = min(start, len(found.tiers))
        if len(found.tiers) <= start:
            return 0, False
        self._announce_stored(request, found.tiers, state.hasher.hashes)
        state.decision = self._decide(found, start, allow_async=not state.waited_async)
        if state.decision is None:
            return 0, False
        self.stats["lookup_hit_tokens"] += state.decision.count * self.block_size
        waits = state.decision.budget is not None or self.host_loads_in_background
        return state.decision.count * self.block_size, waits

    def _decide(self, found: _Lookup, start: int, allow_async: bool = True) -> _Decision | None:
        """Load the leased host run synchronously, or everything found asynchronously when the
        deeper tiers are expected to beat recomputing by a clear margin. A request that already
        waited for an asynchronous load (given up, or failed) is not made to wait again: vLLM
        asks again after a partial load, and a second wait would spend a second allowance."""
        end = len(found.tiers)
        if allow_async and end > max(found.host_run, start):
            expected = self.estimates.load_s(self._bytes_by_tier(found.tiers[start:end]))
            count = end - start
            recompute = self.estimates.recompute_s(count * self.block_size)
            deepest = max(found.tiers[start:end], key=_tier_rank)
            stale = time.monotonic() - self._tried_at.get(deepest, 0.0) > _RETRY_DECLINED_S
            if recompute is None or expected <= self.settings.load_worth_ratio * recompute or stale:
                # A tier measured as too slow is tried again now and then (within the budget, which
                # bounds what a try can cost): a slow start must not rule it out for good.
                self._tried_at[deepest] = time.monotonic()
                block_s = self.estimates.recompute_s(self.block_size)
                budget = LossBudget(count, block_s, expected, self.settings.max_loss_fraction, self.settings.min_loss_s)
                return _Decision(start, count, budget, deepest)
            self.stats["loads_declined"] += 1
            log.debug("load from %s declined: expected %.1f ms against %.1f ms to recompute", deepest, expected * 1000, recompute * 1000)
        if found.host_run > start:
            return _Decision(start, found.host_run - start, None, "host")
        return None

    def _abandon(self, state: _RequestState) -> None:
        """Forget the request's lookup; its leases are released whenever it completes."""
        pending, state.pending_lookup = state.pending_lookup, None
        if pending is not None:
            pending.add_done_callback(lambda f: self._release_lookup(None if f.cancelled() or f.exception() else f.result()))

    def _release_lookup(self, found: _Lookup | None) -> None:
        if found is not None and found.grants:
            self._release(found.lease_ids())

    def _release(self, lease_ids: Iterable[int]) -> None:
        """Release leases on a background thread (never on the step)."""
        lease_ids = list(lease_ids)
        if not lease_ids:
            return

        def release_all(client: DaemonClient) -> None:
            for lease_id in lease_ids:
                try:
                    client.release(lease_id)
                except LeaseError:
                    pass  # expired meanwhile

        try:
            self._releaser.submit(self.link.call, release_all)
        except RuntimeError:
            pass  # shutting down: the daemon reclaims them when our connections close

    def _report_prefill_rate(self) -> None:
        """Tell the daemon the measured prefill rate now and then (off the step), for the next
        engine of this layout on the node."""
        rate = self.estimates.prefill_tokens_per_s
        now = time.monotonic()
        if rate is None or now - self._reported_rate_at < _REPORT_RATE_EVERY_S:
            return
        self._reported_rate_at = now

        def report(client: DaemonClient) -> None:
            for layout in self.layouts:
                client.register_layout(layout, prefill_tokens_per_s=rate)

        try:
            self._releaser.submit(self.link.call, report)
        except RuntimeError:
            pass

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        state = self._state(request)
        decision, state.decision = state.decision, None
        if num_external_tokens <= 0 or decision is None:
            if num_external_tokens <= 0:
                self._abandon(state)  # a resumed request looks up afresh; unused leases go back
            return
        found = state.pending_lookup.result()
        state.pending_lookup = None
        count = min(decision.count, num_external_tokens // self.block_size)
        start = decision.start
        block_ids = tuple(blocks.get_block_ids()[0][start : start + count])
        hashes = tuple(state.hasher.hashes[start : start + count])
        if decision.budget is None:
            leases = {
                layout_id: LeasedSlots(grant.lease_id, found.daemon_instance,
                                       tuple(b.offset for b in grant.blocks[start : start + count]),
                                       tuple(b.checksum for b in grant.blocks[start : start + count]))
                for layout_id, grant in found.grants.items()
            }
            background = self.host_loads_in_background
            self.pending_loads.append(LoadSpec(request.request_id, block_ids, hashes, leases=leases, background=background))
            if background:
                self._async_started[request.request_id] = (time.monotonic(), "host")
                self.stats["background_loads"] += 1
        else:
            self._release_lookup(found)  # the worker leases what it promotes itself
            self.pending_loads.append(LoadSpec(request.request_id, block_ids, hashes, budget=decision.budget, tier=decision.tier))
            self._async_started[request.request_id] = (time.monotonic(), decision.tier)
            state.waited_async = True
            self.stats["async_loads"] += 1
        for grant in found.grants.values():
            self._lease_ttl_s = grant.expires_in_s
        state.loaded = range(start, start + count)
        self.stats["load_requests"] += 1

    # ---- per-step metadata -------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVTierConnectorMetadata:
        meta = KVTierConnectorMetadata(loads=self.pending_loads, scheduled_tokens=scheduler_output.total_num_scheduled_tokens)
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
        if self._descriptions:
            self._send_descriptions()
        return meta

    def _plan_save(self, req_id: str, state: _RequestState, computed: int, meta: KVTierConnectorMetadata) -> None:
        request = state.request
        # With async scheduling a step is planned before the tokens it feeds are known (vLLM's
        # output placeholders): a block is saved only once all its tokens are known, on a later step.
        known = len(request.all_token_ids)
        full = min(computed, known) // self.block_size
        full = min(full, len(state.block_ids))
        if not self.settings.save_generated:
            full = min(full, request.num_prompt_tokens // self.block_size)
        if full <= state.saved_upto:
            return
        with state.hash_lock:  # (uncontended unless a lookup given up as late is still hashing)
            hashes = state.hasher.update(request.all_token_ids[: full * self.block_size])
        first = max(state.saved_upto, state.held_on_gpu)
        self.stats["save_skipped_held_blocks"] += max(min(full, state.held_on_gpu) - state.saved_upto, 0)
        indexes = [i for i in range(first, full) if i not in state.loaded]
        state.saved_upto = full
        if not indexes:
            return
        meta.saves.append(SaveSpec(req_id, tuple(state.block_ids[i] for i in indexes), tuple(hashes[i] for i in indexes)))
        state.has_saves = True
        self._remember_for_events(request, indexes, hashes)
        if self.link.wants_block_descriptions:
            lora = getattr(getattr(request, "lora_request", None), "lora_name", None)
            size = self.block_size
            self._descriptions.extend(
                (hashes[i], hashes[i - 1] if i else None, list(request.all_token_ids[i * size:(i + 1) * size]), lora) for i in indexes
            )

    def _send_descriptions(self) -> None:
        """The token ids of this step's saves, to a daemon that publishes vLLM KV events (off the step)."""
        described, self._descriptions = self._descriptions, []

        def describe(client: DaemonClient) -> None:
            client.describe_blocks(described)

        try:
            self._releaser.submit(self.link.call, describe)
        except RuntimeError:
            pass  # shutting down

    # ---- lifecycle and events ----------------------------------------------------------------

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        state = self.requests.pop(request.request_id, None)
        self._async_started.pop(request.request_id, None)
        self._async_loaded.pop(request.request_id, None)
        if state is None:
            return False, None
        self._abandon(state)  # a lookup it never used
        # Saves copy out of the engine's blocks after the step; keep them until the workers say so.
        return state.has_saves, None

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
        now = time.monotonic()
        while self._lookup_reads:
            self.estimates.observe_read(*self._lookup_reads.pop())
        meta = getattr(output, "kv_connector_worker_meta", None)
        if not isinstance(meta, KVTierWorkerMetadata):
            meta = None
        for req_id, load in (meta.async_loaded.items() if meta else ()):  # (with TP, ranks may report in different steps)
            self._async_loaded[req_id] = min(load, self._async_loaded.get(req_id, load))
        for req_id in getattr(output, "finished_recving", None) or ():
            started = self._async_started.pop(req_id, None)
            load = self._async_loaded.pop(req_id, AsyncLoaded(0, 0.0, 0.0))
            if started is not None:  # the whole wait, as the request saw it: promotion, lease, copy, hand-offs
                at, tier = started
                # What arrived in that time (a load given up early moved fewer blocks than it
                # asked for; one that got none still says a block takes longer than this), less
                # what the worker waited before asking the daemon (a reconnect after a restart):
                # that is not the tier's cost.
                nbytes = max(load.blocks, 1) * self.block_nbytes
                self.estimates.observe_load(tier, nbytes, max(now - at - load.before_fetch_s, 1e-6))
                if load.fetch_s > 0:
                    self.estimates.observe_read(tier, nbytes, load.fetch_s)
        if meta is None:
            return
        self._release(meta.copied_leases)
        for tokens, seconds in meta.step_samples:
            self.estimates.observe_step(tokens, seconds)
        if meta.step_samples:
            self._report_prefill_rate()
        if not meta.committed:
            return
        from vllm.distributed.kv_events import MEDIUM_CPU, BlockStored

        shards = {layout.layout_id for layout in self.layouts}
        for layout_id, hashes in meta.committed.items():
            for block_hash in hashes:
                pending = self.unannounced.get(block_hash)
                if pending is None:
                    continue
                pending.held_by.add(layout_id)
                if pending.held_by < shards:  # with tensor parallelism: announced once every shard holds it
                    continue
                del self.unannounced[block_hash]
                self.events.append(BlockStored(
                    block_hashes=[pending.vllm_hash], parent_block_hash=pending.parent_vllm_hash, token_ids=pending.token_ids,
                    block_size=self.block_size, lora_id=None, medium=MEDIUM_CPU, lora_name=pending.lora_name,
                ))

    def take_events(self) -> list[Any]:
        events, self.events = self.events, []
        return events

    def shutdown(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)
        self._releaser.shutdown(wait=True)
        self.link.close()
        log.info("KVTierConnector scheduler stats: %s; slowest lookup %.1f ms; prefill %s tokens/s", dict(self.stats),
                 self.slowest_lookup_s * 1000, self.estimates.prefill_tokens_per_s)


_TIER_ORDER = {"host": 0, "disk": 1, "peer": 2, "s3": 3}
_REPORT_RATE_EVERY_S = 10.0
_RETRY_DECLINED_S = 5.0  # a tier whose loads were declined is tried again after this long
_MAX_UNANNOUNCED = 1 << 16


def _external(block_hash: Any) -> Any:
    """vLLM's block hash as its own events publish it (an int unless configured otherwise)."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    return maybe_convert_block_hash(block_hash)


def _tier_rank(tier: str) -> int:
    return _TIER_ORDER.get(tier, len(_TIER_ORDER))
