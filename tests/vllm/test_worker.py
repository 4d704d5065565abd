"""The worker half against a real daemon, on tensors shaped like vLLM's: host-memory loads
verified and copied off the step (corrupt slots never reach the engine), and a preemption that
cuts a running save short, so handle_preemptions returns after one chunk at most."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("vllm")

from connectors.vllm.metadata import KVTierConnectorMetadata, SaveSpec  # noqa: E402
from connectors.vllm.settings import settings_from  # noqa: E402
from kvtier.blocks import hash_prompt  # noqa: E402
from kvtier.testing.daemon import LocalDaemon, wait_until  # noqa: E402
from tests.vllm.fakes import fake_attention_backend, fake_configs  # noqa: E402, F401 - a fixture, used by name

pytestmark = pytest.mark.usefixtures("fake_attention_backend")

BLOCKS, PER_CHUNK = 20, 4


@pytest.fixture
def daemon(small_daemon: LocalDaemon) -> LocalDaemon:
    return small_daemon


def test_a_preemption_cuts_a_running_copy_after_its_current_chunk(daemon: LocalDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors.vllm import worker as worker_module

    worker, cache = _worker(daemon)
    try:
        cache.normal_()
        monkeypatch.setattr(worker_module, "COMMIT_CHUNK_BYTES", PER_CHUNK * worker.layout.block_nbytes)
        in_first_chunk, go_on = threading.Event(), threading.Event()
        gathers: list[int] = []
        gather = worker.copier.gather

        def slow_first_gather(*args, **kwargs):
            gathers.append(len(args[1]))
            if len(gathers) == 1:
                in_first_chunk.set()
                go_on.wait(10)
            return gather(*args, **kwargs)

        worker.copier.gather = slow_first_gather
        hashes = tuple(hash_prompt(list(range(16 * BLOCKS)), 16))
        worker.wait_for_save(KVTierConnectorMetadata(saves=[SaveSpec("r1", tuple(range(BLOCKS)), hashes)]))
        assert in_first_chunk.wait(10)
        threading.Timer(0.2, go_on.set).start()
        started = time.monotonic()
        worker.handle_preemptions(KVTierConnectorMetadata(preempted_req_ids={"r1"}))
        waited = time.monotonic() - started
        assert wait_until(lambda: worker.stats["save_cut_blocks"] == BLOCKS - PER_CHUNK, 10), dict(worker.stats)
        assert gathers == [PER_CHUNK]  # the engine's blocks were not read again after the preemption
        assert waited < 5  # (the first chunk only: a bound, not a timing)
        with daemon.client() as client:
            assert client.lookup(worker.layout.layout_id, list(hashes)) == ["host"] * PER_CHUNK
            assert wait_until(lambda: client.stats().active_reservations == 0, 10)  # the cut slots went back
    finally:
        worker.shutdown()


def _worker(daemon: LocalDaemon, blocks: int = BLOCKS + 4):
    import torch

    from connectors.vllm.worker import WorkerSide

    vllm_config, kv_cache_config = fake_configs()  # one layer, 2 KV heads of 64, fp16, 16-token blocks: 8 KiB pages
    worker = WorkerSide(vllm_config, kv_cache_config, settings_from({"socket_path": str(daemon.socket_path), "model_revision": "w"}))
    cache = torch.zeros(blocks, 2, 16, 128, dtype=torch.float16)
    worker.register_kv_caches({"layer.0": cache})
    assert worker.enabled
    return worker, cache


@pytest.mark.parametrize("corrupt", [None, 2], ids=["intact", "third-slot-corrupt"])
def test_a_host_load_is_verified_and_copied_off_the_step(daemon: LocalDaemon, corrupt: int | None) -> None:
    import torch

    from connectors.vllm.metadata import LeasedSlots, LoadSpec

    worker, cache = _worker(daemon)
    try:
        source = torch.randn(6, 2, 16, 128, dtype=torch.float16)
        hashes = tuple(hash_prompt(list(range(16 * 6)), 16))
        layout_id = worker.layout.layout_id
        with daemon.client() as client:
            client.register_layout(worker.layout)
            client.write_blocks(layout_id, {h: source[i].contiguous().view(torch.uint8).numpy().tobytes() for i, h in enumerate(hashes)})
            grant = client.acquire(layout_id, list(hashes))
            slots = LeasedSlots(grant.lease_id, client.daemon_instance, tuple(b.offset for b in grant.blocks),
                                tuple(b.checksum for b in grant.blocks))
            if corrupt is not None:  # a writer that went wrong: the slot no longer matches its checksum
                view = worker._mapping.arena.view(slots.offsets[corrupt], worker.layout.block_nbytes)
                view[:8] = bytes(8)  # (a random half block could start with zeros: flip them too)
                view[8:16] = b"\xff" * 8
            targets = tuple(range(10, 16))
            on_step = threading.current_thread().name
            copied_on: list[str] = []
            scatter = worker.copier.scatter

            def recording_scatter(*args, **kwargs):
                copied_on.append(threading.current_thread().name)
                return scatter(*args, **kwargs)

            worker.copier.scatter = recording_scatter
            worker.start_load_kv(KVTierConnectorMetadata(loads=[LoadSpec("r1", targets, hashes, leases={layout_id: slots},
                                                                         background=True)]))
            assert wait_until(lambda: worker.get_finished(set())[1] == {"r1"}, 10)  # reported received
            good = len(hashes) if corrupt is None else corrupt
            assert copied_on == [copied_on[0]] and copied_on[0] != on_step  # one copy, on the loader thread
            assert torch.equal(cache[10:10 + good], source[:good])
            assert worker.get_block_ids_with_load_errors() == set(targets[good:])  # recomputed by vLLM
            assert not cache[10 + good:16].any()  # nothing unverified reached the engine
            meta = worker.build_worker_meta()
            assert meta.copied_leases == {grant.lease_id} and meta.async_loaded["r1"].blocks == good
            client.release(grant.lease_id)
    finally:
        worker.shutdown()
