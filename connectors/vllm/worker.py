"""The worker half of KVTierConnector: bytes between vLLM's paged KV cache and the daemon's arena.

Nothing on the step calls the daemon:

- **Host-memory loads** (blocks the scheduler leased in host memory) are copied straight from
  the arena offsets in the step's metadata: each slot's checksum is verified first, then the
  verified leading run is scattered into the engine's blocks. By default (``host_loads:
  background``) a loader thread does this while the request waits a step (on CUDA on its own
  stream); with ``on_step`` it happens before the step's forward (on CUDA the forward is ordered
  after the copy on the GPU, without a host wait). The worker then reports the lease as copied and
  the scheduler releases it. A step with nothing scheduled waits (``load_wait_s``) for a load in
  flight rather than spinning.
- **Asynchronous loads** (disk, S3, peers) run on a loader thread: ask the daemon to promote the
  blocks, watch them arrive, and stop as soon as waiting longer would cost the request more than
  its :class:`~connectors.vllm.estimates.LossBudget` allows; lease what arrived, and let the next
  step copy it (verified, as above) and report the request through ``get_finished``.
- Any block that cannot be loaded or fails its checksum is reported by
  ``get_block_ids_with_load_errors`` and vLLM recomputes it: a load never puts unchecked bytes into
  the engine.
- **Saves** never run on the step: ``wait_for_save`` queues them for a saver thread (reserve
  slots, copy the blocks out after the step's compute finished, checksum each slot while its
  bytes are hot, commit). A request's blocks are needed only until they are copied out: a
  finished request is reported done then, and a preempted request's not-yet-started saves are
  dropped in ``handle_preemptions``, which waits only for a copy already running (memory speed).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from connectors.vllm import step_timer
from connectors.vllm.identity import check_registered, layer_attention_backends, layout_for_rank
from connectors.vllm.link import DaemonLink
from connectors.vllm.metadata import AsyncLoaded, KVTierConnectorMetadata, KVTierWorkerMetadata, LoadSpec, SaveSpec
from connectors.vllm.settings import ConnectorSettings
from connectors.vllm.stats import StatsInterval
from kvtier.blocks import KVLayout, payload_checksum
from kvtier.client import DaemonClient, ReserveStatus
from kvtier.client.commit_pipeline import COMMIT_CHUNK_BYTES
from kvtier.client.types import FetchResult
from kvtier.copy import describe_paged_kv, make_page_copier
from kvtier.copy.base import CudaEventHandle
from kvtier.errors import CopyError, LayoutError, LeaseError
from kvtier.tiers.arena import SharedArena

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger: its handler, format and VLLM_LOGGING_LEVEL
_PREEMPTION_WAIT_S = 10.0  # a running copy-out is memory speed; this only bounds a broken device
_SAVE_BATCH = 64  # save specs merged into one reserve/copy/commit round
_CALL_SLACK_S = 0.1  # a fetch's deadline beyond the longest wait its budget allows


def _tensor_parallel_rank(tp_size: int) -> int:
    """This worker's tensor-parallel rank; LayoutError where vLLM cannot say (a guess would load
    another rank's heads)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (ImportError, AssertionError, RuntimeError) as exc:
        if tp_size == 1:
            return 0
        raise LayoutError(f"cannot tell this worker's tensor-parallel rank of {tp_size} ({type(exc).__name__}: {exc})") from None


class _Mapping(NamedTuple):
    """The daemon's arena as this worker maps it, and which run of the daemon it belongs to."""

    daemon_instance: str
    arena: SharedArena
    tensor: torch.Tensor


class _Slots(NamedTuple):
    """Arena slots to copy into engine blocks: offsets and the checksums they must match."""

    daemon_instance: str
    offsets: Sequence[int]
    checksums: Sequence[int]


@dataclass(slots=True)
class _FetchTimes:
    """How long an asynchronous load waited before its fetch call, and how long the call took
    (zero when no call was made)."""

    before_fetch_s: float = 0.0
    fetch_s: float = 0.0


class _Fetched(NamedTuple):
    """An asynchronous load the loader thread is done with: its lease (None: nothing to copy)."""

    spec: LoadSpec
    leased: tuple[int, _Slots] | None
    times: _FetchTimes


@dataclass(slots=True)
class _SaveJob:
    seq: int
    spec: SaveSpec
    compute_done: Any  # a CUDA event after the forward that wrote the blocks, or None
    copied: bool = False  # its blocks are out of the engine's cache (or never will be)


class WorkerSide:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.enabled = False
        self.interval = StatsInterval()
        self.stats = self.interval.total
        try:
            rank = _tensor_parallel_rank(vllm_config.parallel_config.tensor_parallel_size)
            self.layout: KVLayout | None = layout_for_rank(vllm_config, kv_cache_config, rank, settings.model_id,
                                                          settings.model_revision)
        except LayoutError as exc:  # what this rank's blocks are cannot be told: never guess
            log.error("KVTierConnector disabled on this worker: %s; no block will be saved or loaded "
                      "(loads the scheduler asks for are reported failed and recomputed)", exc)
            self.layout, self.link = None, None
        else:
            self.link = DaemonLink(settings, [self.layout], client_id=f"vllm-worker-{rank}-{os.getpid()}", role="vllm-worker",
                                   stats=self.stats)
        self.paged: Any = None
        self.copier: Any = None
        self._mapping: _Mapping | None = None
        self._map_lock = threading.Lock()
        self._lock = threading.Condition()
        # saves
        self._seq = itertools.count(1)
        self._pending_copies: Counter[str] = Counter()  # save jobs queued or copying, per request
        self._copying: Counter[str] = Counter()
        self._cancelled_upto: dict[str, int] = {}  # preempted: jobs up to this seq are dropped
        self._save_reqs: set[str] = set()
        self._finished_waiting: set[str] = set()
        self._committed: set[bytes] = set()
        self._save_queue: queue.Queue[_SaveJob | None] = queue.Queue()
        self._saver = threading.Thread(target=self._save_loop, name="kvtier-saver", daemon=True)
        # loads
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="kvtier-loader")
        self._releaser = ThreadPoolExecutor(1, thread_name_prefix="kvtier-release")
        self._ready: list[_Fetched] = []  # promoted and leased: copy next step
        self._loads_in_flight = 0  # on the loader threads (under _lock, which they notify when one ends)
        self._recving_done: set[str] = set()
        self._failed_block_ids: set[int] = set()
        self._copied_leases: set[int] = set()
        self._async_loaded: dict[str, AsyncLoaded] = {}  # finished asynchronous loads, for the scheduler's estimates
        self._copies_in_flight: list[tuple[CudaEventHandle, int]] = []  # (scatter, scheduler lease) on CUDA
        # timings for the scheduler's estimates
        self._step_started: Any = None
        self._step_load_s = 0.0
        self._step_samples: list[tuple[int, float]] = []
        self._warmed_up = False  # the first timed step (one-off costs) is not sampled
        self._cuda_steps: list[tuple[int, Any, Any]] = []
        self._closed = False

    # ---- setup -------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.layout is None:
            return  # disabled at construction (logged there)
        names = [n for n in self.kv_cache_config.kv_cache_groups[0].layer_names if n in kv_caches]
        self._kv_caches = {name: kv_caches[name] for name in names}
        if not self._describe():
            return
        device = next(iter(kv_caches.values())).device
        self.copier = make_page_copier(device)
        self.link.call(self._map_arena)  # at start-up, not on the first step that needs the daemon
        self.enabled = True
        self._saver.start()
        atexit.register(self.shutdown)  # an engine that exits without shutdown() still flushes its saves
        log.info("KVTierConnector worker ready: layout %s, %d-byte blocks, copies via %s",
                 self.layout.layout_id, self.layout.block_nbytes, type(self.copier).__name__)

    def pause(self) -> None:
        """vLLM 0.33 sleep mode: finish in-flight saves and stop touching the KV cache."""
        if not self.enabled:
            return
        with self._lock:
            self._lock.wait_for(lambda: not self._pending_copies, _PREEMPTION_WAIT_S)
        self.enabled = False

    def resume(self) -> None:
        """After wake-up the KV cache may sit at new addresses: describe it again."""
        if self.paged is None or self.enabled:
            return
        if self._describe():
            self.enabled = True

    def _describe(self) -> bool:
        """Check and describe the registered tensors (again after a wake-up); False, with the
        reason logged, where their blocks are not what the layout id says or cannot be copied."""
        try:
            check_registered(self._kv_caches, self.layout, layer_attention_backends(self.vllm_config, list(self._kv_caches)))
            self.paged = describe_paged_kv(self._kv_caches)  # CopyError: vLLM's LHBNC, BHLNC pages
        except (LayoutError, CopyError) as exc:
            log.error("KVTierConnector disabled: %s; no block will be saved or loaded", exc)
            return False
        if self.paged.slot_nbytes != self.layout.block_nbytes:
            log.error("KVTierConnector disabled: the engine's blocks are %d bytes but layout %s expects %d; no block will be "
                      "saved or loaded", self.paged.slot_nbytes, self.layout.layout_id, self.layout.block_nbytes)
            return False
        return True

    def _map_arena(self, client: DaemonClient) -> _Mapping:
        """The daemon's arena, mapped (again after a daemon restart) off the step."""
        with self._map_lock:
            arena = client.arena()
            mapping = self._mapping
            if mapping is None or mapping.arena is not arena:
                tensor = torch.frombuffer(arena.buffer, dtype=torch.uint8)
                self.copier.register_host(tensor)  # CUDA: pin it now, not inside a copy on the step
                if mapping is not None:
                    # Unmapping a large arena (and freeing its pages, once the restarted daemon
                    # removed the file) takes a while: never on the path of the call that found it.
                    threading.Thread(target=self._unmap, args=(mapping,), name="kvtier-unmap", daemon=True).start()
                mapping = self._mapping = _Mapping(client.daemon_instance or "", arena, tensor)
            return mapping

    def _unmap(self, mapping: _Mapping) -> None:
        """Let go of a dead daemon's arena: the client closed it; the map goes away with the last
        reference to its tensor, which this thread holds once the copier forgot it."""
        self.copier.unregister_host(mapping.tensor)

    # ---- step timing (for the scheduler's prefill-rate estimate) ------------------------------

    def on_bind(self, meta: KVTierConnectorMetadata) -> None:
        if not self.enabled or meta.scheduled_tokens < 2 * self.layout.block_size:
            self._step_started = None
            return
        self._step_load_s = 0.0
        if self.paged.device.type == "cuda":
            self._step_started = torch.cuda.Event(enable_timing=True)
            self._step_started.record(torch.cuda.current_stream(self.paged.device))
        else:
            self._step_started = time.perf_counter()

    def _end_step(self, meta: KVTierConnectorMetadata) -> None:
        started, self._step_started = self._step_started, None
        if started is None:
            return
        if isinstance(started, float):
            if not self._warmed_up:
                # A new engine's first forward pays one-off costs (allocations, first kernels):
                # measured 2-2.5x a later one of the same size here, it would inflate the rate.
                self._warmed_up = True
                return
            self._step_samples.append((meta.scheduled_tokens, time.perf_counter() - started - self._step_load_s))
        else:  # read once the GPU got there: never wait for it
            ended = torch.cuda.Event(enable_timing=True)
            ended.record(torch.cuda.current_stream(self.paged.device))
            self._cuda_steps.append((meta.scheduled_tokens, started, ended))

    # ---- loads -------------------------------------------------------------------------------

    def start_load_kv(self, meta: KVTierConnectorMetadata) -> None:
        if meta.scheduled_tokens == 0 and not meta.loads and self._loads_in_flight:
            self._wait_while_idle()
        started = time.perf_counter()
        for spec in meta.loads:
            if not self.enabled:
                self._fail(spec.block_ids)
                if spec.is_async:
                    self._async_loaded[spec.req_id] = AsyncLoaded(0, 0.0, 0.0)
                    self._mark_received(spec.req_id)
                for slots in spec.leases.values():
                    self._copied_leases.add(slots.lease_id)
            elif spec.background:
                self._submit_load(self._load_in_background, spec)
            elif spec.is_async:
                self._submit_load(self._fetch, spec, time.monotonic())
            else:
                self._load_leased(spec)
        # Deeper-tier loads whose blocks arrived and are leased: copy them now, on this thread.
        # (A loader thread would fight the engine loop for the GIL and take far longer.)
        if self._ready:  # the common case is empty: no lock taken on the step
            with self._lock:
                ready, self._ready = self._ready, []
            for spec, leased, times in ready:
                loaded = 0
                try:
                    if leased is None:
                        self._fail(spec.block_ids)
                    else:
                        lease_id, slots = leased
                        handle, loaded = self._copy_in(spec, slots)
                        if handle is not None:
                            handle.wait()  # (CUDA: rare, and before the request's first forward)
                        self._releaser.submit(self._release_own, lease_id)
                finally:
                    self._async_loaded[spec.req_id] = AsyncLoaded(loaded, times.before_fetch_s, times.fetch_s)
                    self._mark_received(spec.req_id)
        if meta.loads:
            self._step_load_s += time.perf_counter() - started

    def _submit_load(self, load: Callable[..., None], *args: Any) -> None:
        with self._lock:
            self._loads_in_flight += 1
        self._loader.submit(load, *args)

    def _wait_while_idle(self) -> None:
        """A step with nothing scheduled, while requests wait for loads on the loader threads:
        wait (``load_wait_s`` at most) for one to end, instead of spinning empty steps that take
        the GIL from the loader. The engine is idle, so the wait delays no one."""
        waited = time.perf_counter()
        with self._lock:
            self._lock.wait_for(lambda: self._ready or self._recving_done or not self._loads_in_flight, self.settings.load_wait_s)
        step_timer.record_idle_wait(time.perf_counter() - waited)

    def _load_ended(self) -> None:
        """A loader thread's load ended (under ``_lock``): wake a step waiting while idle."""
        self._loads_in_flight -= 1
        self._lock.notify_all()

    def _load_leased(self, spec: LoadSpec) -> None:
        slots = spec.leases.get(self.layout.layout_id)
        if slots is None:
            self._fail(spec.block_ids)
            return
        lease_id = slots.lease_id
        handle, _ = self._copy_in(spec, _Slots(slots.daemon_instance, slots.offsets, slots.checksums))
        if isinstance(handle, CudaEventHandle):
            self._copies_in_flight.append((handle, lease_id))  # the lease holds the slots until the GPU read them
        else:
            self._copied_leases.add(lease_id)

    def _load_in_background(self, spec: LoadSpec) -> None:
        """Loader thread: verify and copy a host-memory load while its request waits, then report
        it received (and its lease copied) to the step, like a load from a lower tier."""
        slots = spec.leases.get(self.layout.layout_id)
        copied = 0
        try:
            if slots is None:
                self._fail(spec.block_ids)
                return
            handle, copied = self._copy_in(spec, _Slots(slots.daemon_instance, slots.offsets, slots.checksums), on_step=False)
            if handle is not None:
                handle.wait()  # (here, not on the step)
        except Exception:  # what was not copied is recomputed
            log.exception("loading blocks of %s in the background failed", spec.req_id)
            self._fail(spec.block_ids[copied:])
        finally:
            with self._lock:
                if slots is not None:
                    self._copied_leases.add(slots.lease_id)
                self._async_loaded[spec.req_id] = AsyncLoaded(copied, 0.0, 0.0)
                self._recving_done.add(spec.req_id)
                self._load_ended()

    def _copy_in(self, spec: LoadSpec, slots: _Slots, on_step: bool = True) -> tuple[Any, int]:
        """Verify the leading run of ``slots`` and scatter it into ``spec``'s blocks; fail the rest.
        Returns the copy's handle (None when nothing was copied) and the blocks copied. On the
        step, a CUDA forward is ordered after the copy; off it the caller waits for the handle."""
        mapping = self._mapping
        good = 0
        if mapping is None or mapping.daemon_instance != slots.daemon_instance:
            self.stats["load_stale_arena"] += 1  # the daemon restarted since; map its new arena off the step
            self._loader.submit(self.link.call, self._map_arena)
        else:
            arena = mapping.arena
            nbytes = self.paged.slot_nbytes
            for offset, checksum in zip(slots.offsets, slots.checksums):
                if payload_checksum(arena.view(offset, nbytes)) != checksum:
                    self.stats["load_corrupt"] += 1
                    break
                good += 1
        handle = None
        if good:
            handle = self.copier.scatter(self.paged, list(spec.block_ids[:good]), mapping.tensor, list(slots.offsets[:good]))
            if isinstance(handle, CudaEventHandle):
                if on_step:
                    torch.cuda.current_stream(self.paged.device).wait_event(handle.event)  # the forward reads after the copy
            else:
                handle.wait()
        self.stats["loaded_blocks"] += good
        if good < len(spec.block_ids):
            self._fail(spec.block_ids[good:])
        return handle, good

    def _fetch(self, spec: LoadSpec, received: float) -> None:
        """Loader thread: have the daemon promote the blocks, within what is left of the
        request's loss budget since the step handed it over (``received``, monotonic), and lease
        the leading run that arrived. The next step copies it."""
        leased = None
        times = _FetchTimes()
        try:
            leased = self.link.call(lambda client: self._promote_and_lease(client, spec, received, times))
        except Exception:  # the copy step fails what is missing
            log.exception("loading blocks of %s failed", spec.req_id)
        with self._lock:
            self._ready.append(_Fetched(spec, leased, times))
            self._load_ended()

    def _promote_and_lease(self, client: DaemonClient, spec: LoadSpec, received: float,
                           times: _FetchTimes) -> tuple[int, _Slots] | None:
        # Map the daemon's current arena first (cheap when mapped): after a daemon restart the
        # copy would otherwise find the lease in an arena this worker does not map yet, and the
        # request would have waited for blocks it then throws away.
        self._map_arena(client)
        # Time spent since the step handed the load over (the loader's queue, a reconnect after a
        # daemon restart, another thread's re-registration) comes out of the request's budget.
        started = time.monotonic()
        times.before_fetch_s = started - received
        fetched = promote_and_lease(client, self.layout.layout_id, spec, spent_s=times.before_fetch_s)
        times.fetch_s = time.monotonic() - started
        self.stats["load_given_up"] += fetched.gave_up
        grant = fetched.lease
        if grant is None or not grant.blocks:
            return None
        return grant.lease_id, _Slots(client.daemon_instance or "", [b.offset for b in grant.blocks], [b.checksum for b in grant.blocks])

    def _release_own(self, lease_id: int) -> None:
        def release(client: DaemonClient) -> None:
            try:
                client.release(lease_id)
            except LeaseError:
                pass  # expired meanwhile

        self.link.call(release)

    def _mark_received(self, req_id: str) -> None:
        with self._lock:
            self._recving_done.add(req_id)

    def _fail(self, block_ids: Sequence[int]) -> None:
        self.stats["load_failed_blocks"] += len(block_ids)
        with self._lock:
            self._failed_block_ids.update(block_ids)

    # ---- saves -------------------------------------------------------------------------------

    def wait_for_save(self, meta: KVTierConnectorMetadata) -> None:
        """Queue this step's saves; returns at once (the saver thread does the work)."""
        self._end_step(meta)
        if not meta.saves:
            return
        if not self.enabled:  # nothing will be saved, but the scheduler holds the blocks until we say so
            with self._lock:
                self._save_reqs.update(spec.req_id for spec in meta.saves)
            self.stats["save_skipped_blocks"] += sum(len(spec.block_ids) for spec in meta.saves)
            return
        compute_done = None
        if self.paged.device.type == "cuda":
            compute_done = torch.cuda.Event()
            compute_done.record(torch.cuda.current_stream(self.paged.device))
        with self._lock:
            for spec in meta.saves:
                self._save_reqs.add(spec.req_id)
                if self._save_queue.qsize() >= self.settings.max_save_queue:
                    self.stats["save_skipped_blocks"] += len(spec.block_ids)
                    continue
                self._pending_copies[spec.req_id] += 1
                self._save_queue.put(_SaveJob(next(self._seq), spec, compute_done))

    def _save_loop(self) -> None:
        while True:
            batch = [self._save_queue.get()]
            while len(batch) < _SAVE_BATCH:  # everything queued meanwhile: one reserve and one commit
                try:
                    batch.append(self._save_queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            jobs = [job for job in batch if job is not None]
            try:
                if jobs:
                    self._save(jobs)
            except Exception:  # a failed save is a future miss, never a failed request
                log.exception("saving %d block batches failed", len(jobs))
                self.stats["save_failed"] += 1
            finally:
                self._copied(jobs)
            if stop:
                return

    def _live(self, jobs: list[_SaveJob]) -> list[_SaveJob]:
        """The jobs not dropped by a preemption (call with the lock held)."""
        return [job for job in jobs if job.seq > self._cancelled_upto.get(job.spec.req_id, 0)]

    def _blocks_still_copying(self, copying: list[_SaveJob]) -> dict[bytes, int]:
        """Engine block id of each hash the jobs in ``copying`` still save, after dropping from it
        (and from ``_copying``, waking handle_preemptions) the jobs a preemption cancelled."""
        with self._lock:
            cancelled = [job for job in copying if job.seq <= self._cancelled_upto.get(job.spec.req_id, 0)]
            for job in cancelled:
                copying.remove(job)
                self._stop_copying(job)
            if cancelled:
                self._lock.notify_all()
        block_of: dict[bytes, int] = {}
        for job in copying:
            for block_id, block_hash in zip(job.spec.block_ids, job.spec.block_hashes):
                block_of.setdefault(block_hash, block_id)
        return block_of

    def _stop_copying(self, job: _SaveJob) -> None:
        """(with the lock held)"""
        req_id = job.spec.req_id
        self._copying[req_id] -= 1
        if self._copying[req_id] <= 0:
            del self._copying[req_id]

    def _copied(self, jobs: list[_SaveJob]) -> None:
        """These jobs no longer need the engine's blocks (copied out, dropped or failed)."""
        with self._lock:
            for job in jobs:
                if job.copied:
                    continue
                job.copied = True
                req_id = job.spec.req_id
                self._pending_copies[req_id] -= 1
                if self._pending_copies[req_id] <= 0:
                    del self._pending_copies[req_id]
                    self._cancelled_upto.pop(req_id, None)
            self._lock.notify_all()

    def _save(self, jobs: list[_SaveJob]) -> None:
        with self._lock:
            live = self._live(jobs)
        self.stats["save_skipped_blocks"] += sum(len(job.spec.block_ids) for job in jobs if job not in live)
        hashes = list(dict.fromkeys(h for job in live for h in job.spec.block_hashes))  # shared prefixes once
        if not hashes:
            return

        def copy_out(client: DaemonClient) -> tuple[list[bytes], list[bytes]]:
            """The hashes committed now, and those the daemon held already."""
            reservations = client.reserve(self.layout.layout_id, hashes, self.paged.slot_nbytes)
            self.stats["save_present_blocks"] += sum(r.status is ReserveStatus.ALREADY_PRESENT for r in reservations)
            self.stats["save_no_space_blocks"] += sum(r.status is ReserveStatus.NO_SPACE for r in reservations)
            with client.commit_pipeline(reservations) as pipeline:
                mapping = self._map_arena(client)
                with self._lock:  # a preemption since the reserve drops its jobs; the rest copy now
                    running = self._live(live)
                    for job in running:
                        self._copying[job.spec.req_id] += 1
                copying = list(running)  # shrinks when a preemption cuts a request's copy short
                filled: list[bytes] = []
                try:
                    for event in {job.compute_done for job in running if job.compute_done is not None}:
                        event.synchronize()  # the forward that wrote these blocks has finished
                    # Copied and committed in chunks: one chunk's commit overlaps the next one's copy.
                    nbytes = self.paged.slot_nbytes
                    per_chunk = max(1, COMMIT_CHUNK_BYTES // nbytes)
                    todo = [r for r in reservations if r.status is ReserveStatus.RESERVED]
                    for start in range(0, len(todo), per_chunk):
                        # A request preempted meanwhile gets its blocks back after this chunk at
                        # most (handle_preemptions waits for that): its blocks are not read again.
                        block_of = self._blocks_still_copying(copying)
                        chunk = [r for r in todo[start:start + per_chunk] if r.block_hash in block_of]
                        if not chunk:
                            continue
                        self.copier.gather(self.paged, [block_of[r.block_hash] for r in chunk], mapping.tensor,
                                           [r.offset for r in chunk]).wait()
                        sums = [payload_checksum(mapping.arena.view(r.offset, nbytes)) for r in chunk]
                        pipeline.filled(chunk, sums)
                        filled.extend(r.block_hash for r in chunk)
                finally:
                    with self._lock:
                        for job in copying:
                            self._stop_copying(job)
                    self._copied(running)  # the engine may reuse their blocks while the commit finishes
            self.stats["save_cut_blocks"] += sum(r.status is ReserveStatus.RESERVED for r in reservations) - len(filled)
            return filled, [r.block_hash for r in reservations if r.status is ReserveStatus.ALREADY_PRESENT]

        outcome = self.link.call(copy_out)
        if outcome is None:
            self.stats["save_unavailable_blocks"] += len(hashes)
            return
        written, present = outcome
        self.stats["saved_blocks"] += len(written)
        with self._lock:  # both are held now: reported for the scheduler's KV events
            self._committed.update(written)
            self._committed.update(present)

    def handle_preemptions(self, meta: KVTierConnectorMetadata) -> None:
        """A preempted request's blocks go to others after this returns: drop its saves that have
        not started and wait for one that is copying (memory speed; never for the daemon)."""
        if not meta.preempted_req_ids:
            return
        with self._lock:
            newest = next(self._seq)
            for req_id in meta.preempted_req_ids & self._pending_copies.keys():
                self._cancelled_upto[req_id] = newest
            done = self._lock.wait_for(lambda: not (meta.preempted_req_ids & self._copying.keys()), _PREEMPTION_WAIT_S)
        if not done:
            log.error("copying out blocks of preempted requests did not finish in %.0fs", _PREEMPTION_WAIT_S)

    # ---- reports to the scheduler ------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if not (self._recving_done or self._finished_waiting or (finished_req_ids and self._save_reqs)):
            return None, None  # the common case: nothing to report, no lock taken
        with self._lock:
            self._finished_waiting |= finished_req_ids & self._save_reqs
            sending = {r for r in self._finished_waiting if r not in self._pending_copies}
            self._finished_waiting -= sending
            self._save_reqs -= sending
            recving, self._recving_done = self._recving_done, set()
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if not self._failed_block_ids:
            return set()
        with self._lock:
            failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def build_worker_meta(self) -> KVTierWorkerMetadata | None:
        if self._copies_in_flight:
            still = []
            for handle, lease_id in self._copies_in_flight:
                if handle.done():
                    self._copied_leases.add(lease_id)
                else:
                    still.append((handle, lease_id))
            self._copies_in_flight = still
        if self._cuda_steps:
            pending = []
            for tokens, started, ended in self._cuda_steps:
                if ended.query():
                    self._step_samples.append((tokens, started.elapsed_time(ended) / 1000))
                else:
                    pending.append((tokens, started, ended))
            self._cuda_steps = pending
        if not (self._committed or self._copied_leases or self._step_samples or self._async_loaded):
            return None
        with self._lock:  # (saves and background loads add to these from their threads)
            committed, self._committed = self._committed, set()
            copied_leases, self._copied_leases = self._copied_leases, set()
            async_loaded, self._async_loaded = self._async_loaded, {}
        meta = KVTierWorkerMetadata({self.layout.layout_id: committed} if committed else {}, copied_leases,
                                    self._step_samples, async_loaded)
        self._step_samples = []
        return meta

    def shutdown(self) -> None:
        """Finish queued saves (up to 30 s), then let go of the daemon. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._saver.is_alive():
            self._save_queue.put(None)
            self._saver.join(timeout=30)
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._releaser.shutdown(wait=True)
        if self.link is not None:
            self.link.close()
        if self.copier is not None:
            self.copier.close()
        log.info("KVTierConnector worker stats: %s", dict(self.stats))


def promote_and_lease(client: DaemonClient, layout_id: str, spec: LoadSpec, spent_s: float = 0.0) -> FetchResult:
    """Have the daemon promote ``spec``'s blocks into host memory and lease the leading run that
    arrived, in one call, within ``spec.budget`` less ``spent_s`` (how long the request has
    waited already): the daemon stops waiting as soon as waiting would cost the request more than
    the budget allows against recomputing, and the call's deadline is the longest wait the budget
    can still allow, plus a little. With the allowance spent, blocks already in host memory are
    still leased, and the daemon waits only while blocks arrive faster than computing them."""
    budget = spec.budget
    return client.fetch(layout_id, list(spec.block_hashes), budget.fetch_budget(spent_s), max_wait_s=budget.max_wait_s(spent_s),
                        timeout_s=_CALL_SLACK_S)
