"""The worker half of KVTierConnector: bytes between vLLM's paged KV cache and the daemon's arena.

- Loads in host memory at lookup time run before the step's forward: acquire a lease, check
  each slot's checksum, copy the slots into the engine's blocks, release. For loads from deeper
  tiers a loader thread asks the daemon to promote the blocks while the request waits; the copy
  then happens in the next step's ``start_load_kv`` and is reported through ``get_finished``. Any block that cannot be loaded or fails its checksum
  is reported by ``get_block_ids_with_load_errors`` and vLLM recomputes it: a load never puts
  unchecked bytes into the engine.
- Saves never run on the step: ``wait_for_save`` queues them for a saver thread (reserve slots,
  copy the blocks in after the step's compute finished, commit). Blocks stay valid meanwhile:
  a finished request's blocks are freed only after its saves are reported done, and a
  preempted request's saves are finished in ``handle_preemptions`` before its blocks are reused.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from connectors.vllm.identity import layout_for_rank
from connectors.vllm.link import DaemonLink
from connectors.vllm.metadata import KVTierConnectorMetadata, KVTierWorkerMetadata, LoadSpec, SaveSpec
from connectors.vllm.settings import ConnectorSettings
from connectors.vllm.stats import StatsInterval
from kvtier.blocks import payload_checksum
from kvtier.client import DaemonClient, ReserveStatus
from kvtier.client.commit_pipeline import COMMIT_CHUNK_BYTES
from kvtier.copy import describe_paged_kv, make_page_copier
from kvtier.tiers.arena import SharedArena

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger(__name__)
_PREEMPTION_WAIT_S = 60.0
_SAVE_BATCH = 64  # save specs merged into one reserve/copy/commit round


def _tensor_parallel_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (ImportError, AssertionError, RuntimeError):
        return 0


class WorkerSide:
    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.kv_cache_config = kv_cache_config
        rank = _tensor_parallel_rank()
        self.layout = layout_for_rank(vllm_config, kv_cache_config, rank, settings.model_id)
        self.link = DaemonLink(settings, [self.layout], client_id=f"vllm-worker-{rank}-{os.getpid()}")
        self.enabled = False
        self.paged: Any = None
        self.copier: Any = None
        self._host: torch.Tensor | None = None
        self._host_arena: SharedArena | None = None
        self._lock = threading.Condition()
        self._pending_saves: Counter[str] = Counter()
        self._save_reqs: set[str] = set()
        self._finished_waiting: set[str] = set()
        self._recving_done: set[str] = set()
        self._promoted: list[LoadSpec] = []
        self._failed_block_ids: set[int] = set()
        self._committed: set[bytes] = set()
        self._save_queue: queue.Queue[tuple[SaveSpec, Any] | None] = queue.Queue()
        self._saver = threading.Thread(target=self._save_loop, name="kvtier-saver", daemon=True)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvtier-loader")
        self._releaser = ThreadPoolExecutor(1, thread_name_prefix="kvtier-release")
        self.interval = StatsInterval()
        self.stats = self.interval.total
        self._closed = False

    # ---- setup -------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = [n for n in self.kv_cache_config.kv_cache_groups[0].layer_names if n in kv_caches]
        self._kv_caches = {name: kv_caches[name] for name in names}
        self.paged = describe_paged_kv(self._kv_caches)
        if self.paged.slot_nbytes != self.layout.block_nbytes:
            log.error(
                "KVTierConnector disabled: the engine's blocks are %d bytes but layout %s expects %d; "
                "no block will be saved or loaded", self.paged.slot_nbytes, self.layout.layout_id, self.layout.block_nbytes,
            )
            return
        device = next(iter(kv_caches.values())).device
        self.copier = make_page_copier(device)
        self.link.connect()  # at start-up, not on the first step that needs the daemon
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
            self._lock.wait_for(lambda: not self._pending_saves and self._save_queue.empty(), _PREEMPTION_WAIT_S)
        self.enabled = False

    def resume(self) -> None:
        """After wake-up the KV cache may sit at new addresses: describe it again."""
        if self.paged is None or self.enabled:
            return
        self.paged = describe_paged_kv(self._kv_caches)
        self.enabled = True

    def _arena(self, client: DaemonClient) -> torch.Tensor:
        """The arena as a uint8 tensor (re-mapped when the daemon restarted)."""
        arena = client.arena()
        if arena is not self._host_arena:
            if self._host is not None:
                self.copier.unregister_host(self._host)  # CUDA: before the old mapping goes away
            self._host = torch.frombuffer(arena.buffer, dtype=torch.uint8)
            self._host_arena = arena
        return self._host

    # ---- loads -------------------------------------------------------------------------------

    def start_load_kv(self, meta: KVTierConnectorMetadata) -> None:
        for spec in meta.loads:
            if not self.enabled:
                self._fail(spec.block_ids)
                if spec.is_async:
                    self._mark_received(spec)
            elif spec.is_async:
                self._loader.submit(self._promote, spec)
            else:
                self._load(spec)
        # Deeper-tier loads whose blocks the daemon has promoted: copy them now, on this thread.
        # (A loader thread would fight the engine loop for the GIL and take far longer.)
        if not self._promoted:  # the common case: no lock taken on the step
            return
        with self._lock:
            ready, self._promoted = self._promoted, []
        for spec in ready:
            try:
                self._load(spec)
            finally:
                self._mark_received(spec)

    def _promote(self, spec: LoadSpec) -> None:
        """Loader thread: wait for the daemon to bring the blocks into host memory (disk, S3)."""
        try:
            wait_s = self.settings.async_load_timeout_s
            self.link.call(lambda c: c.prefetch(self.layout.layout_id, list(spec.block_hashes), wait_s=wait_s))
        except Exception:  # the copy step will find what is missing and report it
            log.exception("promoting blocks of %s failed", spec.req_id)
        with self._lock:
            self._promoted.append(spec)

    def _mark_received(self, spec: LoadSpec) -> None:
        with self._lock:
            self._recving_done.add(spec.req_id)

    def _load(self, spec: LoadSpec) -> None:
        """Copy the leading blocks of ``spec`` the daemon holds (verified); report the rest as failed."""

        def copy_in(client: DaemonClient) -> int:
            grant = client.acquire(self.layout.layout_id, list(spec.block_hashes))
            try:
                host = self._arena(client)
                good = 0
                for block in grant.blocks:
                    slot = self._host_arena.view(block.offset, block.nbytes)
                    if block.nbytes != self.paged.slot_nbytes or payload_checksum(slot) != block.checksum:
                        self.stats["load_corrupt"] += 1
                        break
                    good += 1
                if good:
                    offsets = [block.offset for block in grant.blocks[:good]]
                    self.copier.scatter(self.paged, list(spec.block_ids[:good]), host, offsets).wait()
                return good
            finally:
                # Off the step, and not behind a long promotion on the loader thread.
                self._releaser.submit(self.link.call, lambda c: c.release(grant.lease_id))

        loaded = self.link.call(copy_in, on_step=True) or 0
        self.stats["loaded_blocks"] += loaded
        if loaded < len(spec.block_ids):
            self._fail(spec.block_ids[loaded:])

    def _fail(self, block_ids: tuple[int, ...]) -> None:
        self.stats["load_failed_blocks"] += len(block_ids)
        with self._lock:
            self._failed_block_ids.update(block_ids)

    # ---- saves -------------------------------------------------------------------------------

    def wait_for_save(self, meta: KVTierConnectorMetadata) -> None:
        """Queue this step's saves; returns at once (the saver thread does the work)."""
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
                self._pending_saves[spec.req_id] += 1
                self._save_queue.put((spec, compute_done))

    def _save_loop(self) -> None:
        while True:
            batch = [self._save_queue.get()]
            while len(batch) < _SAVE_BATCH:  # everything queued meanwhile: one reserve and one commit
                try:
                    batch.append(self._save_queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            items = [item for item in batch if item is not None]
            try:
                if items:
                    self._save([spec for spec, _ in items], [done for _, done in items if done is not None])
            except Exception:  # a failed save is a future miss, never a failed request
                log.exception("saving %d block batches failed", len(items))
                self.stats["save_failed"] += 1
            finally:
                with self._lock:
                    for spec, _ in items:
                        self._pending_saves[spec.req_id] -= 1
                        if self._pending_saves[spec.req_id] <= 0:
                            del self._pending_saves[spec.req_id]
                    self._lock.notify_all()
            if stop:
                return

    def _save(self, specs: list[SaveSpec], compute_done: list[Any]) -> None:
        unique: dict[bytes, int] = {}  # requests sharing a prefix save its blocks once
        for spec in specs:
            for block_id, block_hash in zip(spec.block_ids, spec.block_hashes):
                unique.setdefault(block_hash, block_id)
        hashes, block_ids = list(unique), list(unique.values())

        def copy_out(client: DaemonClient) -> list[bytes]:
            reservations = client.reserve(self.layout.layout_id, hashes, self.paged.slot_nbytes)
            wanted = [(block_id, r) for block_id, r in zip(block_ids, reservations) if r.status is ReserveStatus.RESERVED]
            self.stats["save_present_blocks"] += sum(r.status is ReserveStatus.ALREADY_PRESENT for r in reservations)
            self.stats["save_no_space_blocks"] += sum(r.status is ReserveStatus.NO_SPACE for r in reservations)
            if not wanted:
                return []
            # Copied and committed in chunks: the daemon checksums one chunk while the next is copied.
            per_chunk = max(1, COMMIT_CHUNK_BYTES // self.paged.slot_nbytes)
            with client.commit_pipeline([r for _, r in wanted]) as pipeline:
                for event in compute_done:  # the forward that wrote these blocks has finished
                    event.synchronize()
                host = self._arena(client)
                for start in range(0, len(wanted), per_chunk):
                    chunk = wanted[start:start + per_chunk]
                    self.copier.gather(self.paged, [b for b, _ in chunk], host, [r.offset for _, r in chunk]).wait()
                    pipeline.filled(r for _, r in chunk)
            return [r.block_hash for _, r in wanted]

        committed = self.link.call(copy_out)
        if committed is None:
            self.stats["save_unavailable_blocks"] += len(block_ids)
            return
        self.stats["saved_blocks"] += len(committed)
        with self._lock:
            self._committed.update(committed)

    def handle_preemptions(self, meta: KVTierConnectorMetadata) -> None:
        """Finish the saves of preempted requests before their blocks are given to others."""
        if not meta.preempted_req_ids:
            return
        with self._lock:
            done = self._lock.wait_for(lambda: not (meta.preempted_req_ids & self._pending_saves.keys()), _PREEMPTION_WAIT_S)
        if not done:
            log.error("saves of preempted requests did not finish in %.0fs", _PREEMPTION_WAIT_S)

    # ---- reports to the scheduler ------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if not (self._recving_done or self._finished_waiting or (finished_req_ids and self._save_reqs)):
            return None, None  # the common case: nothing to report, no lock taken
        with self._lock:
            self._finished_waiting |= finished_req_ids & self._save_reqs
            sending = {r for r in self._finished_waiting if r not in self._pending_saves}
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
        if not self._committed:
            return None
        with self._lock:
            if not self._committed:
                return None
            committed, self._committed = self._committed, set()
        return KVTierWorkerMetadata(committed)

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
        self.link.close()
        if self.copier is not None:
            self.copier.close()
        log.info("KVTierConnector worker stats: %s", dict(self.stats))

