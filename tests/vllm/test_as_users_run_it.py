"""kvtier the way users run it: vLLM's own process layout and CPU pinning (no test shortcuts), a
model with 1 MiB KV blocks, prompts of thousands of tokens, the embedded default and an
operator-run daemon.

- The embedded daemon, started from inside a pinned vLLM worker, runs on the machine's CPUs,
  survives its engine's shutdown (vLLM kills its process tree) with its host tier, and serves the
  next, fresh engine: most prompt tokens come from kvtier, outputs are identical, and no daemon
  call misses its deadline.
- A daemon that stops answering (SIGSTOP) costs requests no stall: outputs stay identical and
  the engine keeps the pace of one without the connector (checked loosely: this is no timing
  test); when the daemon resumes, requests hit again.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import tempfile
from pathlib import Path

import psutil
import pytest

from kvtier.cli.stop import daemon_pid, stop_daemon
from kvtier.client import DaemonClient
from kvtier.daemon.detach import machine_cpus
from kvtier.daemon.server import arena_name_for
from kvtier.testing.daemon import LocalDaemon, free_port, wait_until
from kvtier.testing.engine import EngineSession
from kvtier.testing.workload import kvtier_connector_config, make_workload
from tests.vllm.conftest import AS_USERS_RUN_IT, EngineRun, run_engine_subprocess

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCK = 32
DOC_TOKENS = 3000  # 93 full blocks of 1 MiB per document
WORKLOAD = make_workload(documents=2, doc_tokens=DOC_TOKENS, questions=2, seed=7)  # [question][document]
WIDE_KWARGS = {"max_model_len": 4096, "kv_cache_memory_bytes": 512 * 1024 * 1024, "max_num_batched_tokens": 2048}
DAEMON_FAILURES = ("is late", "unreachable", "did not answer", "refused a call")


def assert_same(run: EngineRun, batch: int, reference: EngineRun, ref_batch: int) -> None:
    assert run.token_ids(batch) == reference.token_ids(ref_batch)
    worst = max(abs(a - b) for got, want in zip(run.logprobs(batch), reference.logprobs(ref_batch)) for a, b in zip(got, want))
    assert worst < 2e-3, f"log-probabilities differ by {worst}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("as-users")


@pytest.fixture(scope="module")
def reference(wide_model: Path, workdir: Path) -> EngineRun:
    """No connector: the first questions, then the second ones, in one engine."""
    return run_engine_subprocess(wide_model, [WORKLOAD[0], WORKLOAD[1]], workdir=workdir, name="reference",
                                 llm_kwargs=WIDE_KWARGS, env=AS_USERS_RUN_IT, max_tokens=8)


def no_daemon_failures(log: str) -> None:
    found = [line for line in log.splitlines() if any(text in line for text in DAEMON_FAILURES)]
    assert not found, "\n".join(found[:10])


def test_embedded_default_outlives_its_engine_and_serves_the_next(wide_model: Path, workdir: Path, reference: EngineRun) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="kve-", dir="/tmp"))
    env = {**AS_USERS_RUN_IT, "XDG_RUNTIME_DIR": str(runtime), "XDG_CACHE_HOME": str(runtime / "cache"),
           "KVTIER_HOST_CAPACITY": "1GiB", "KVTIER_HOST_SHM_DIR": str(runtime), "KVTIER_DAEMON_METRICS_ADDRESS": f"127.0.0.1:{free_port()}"}
    socket_path = runtime / "kvtier" / "kvtier.sock"
    config = kvtier_connector_config(None)  # the README's line: no daemon address
    try:
        fill = run_engine_subprocess(wide_model, [WORKLOAD[0]], workdir=workdir, name="embedded-fill", env=env,
                                     kv_transfer_config=config, llm_kwargs=WIDE_KWARGS, max_tokens=8)
        assert_same(fill, 0, reference, 0)
        pid = daemon_pid(socket_path)
        assert pid is not None, "the daemon did not survive the engine's shutdown"
        daemon = psutil.Process(pid)
        assert set(daemon.cpu_affinity()) == machine_cpus(), "the daemon kept the pinned worker's CPU affinity"
        assert "OMP_NUM_THREADS" not in daemon.environ()
        with DaemonClient(socket_path) as client:
            assert wait_until(lambda: client.stats().chain.tiers[0].blocks >= 2 * (DOC_TOKENS // BLOCK), timeout=60)
        fresh = run_engine_subprocess(wide_model, [WORKLOAD[1]], workdir=workdir, name="embedded-fresh", env=env,
                                      kv_transfer_config=config, llm_kwargs=WIDE_KWARGS, max_tokens=8)
        assert_same(fresh, 0, reference, 1)
        shared = 2 * (DOC_TOKENS // BLOCK) * BLOCK
        assert fresh.counters(0)["external_prefix_cache_hits"] >= 0.9 * shared, fresh.counters(0)
        no_daemon_failures(fill.log + fresh.log)
        assert daemon.is_running()
        arena = runtime / arena_name_for(socket_path)
        assert arena.exists()
        assert stop_daemon(socket_path, timeout_s=60)
        assert not arena.exists() and not socket_path.exists()
    finally:
        pid = daemon_pid(socket_path)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_stopped_daemon_costs_no_stall(tiny_model: Path, tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="kvs-", dir="/tmp"))
    daemon = LocalDaemon(root, host_capacity="256MiB")
    daemon.start()
    workload = make_workload(documents=4, doc_tokens=1024, questions=3, seed=11)
    config = kvtier_connector_config(daemon.socket_path, retry_after_s=0.2)
    try:
        with EngineSession(tiny_model, log_path=tmp_path / "base.log", llm_kwargs={"enable_prefix_caching": False}) as base, \
             EngineSession(tiny_model, log_path=tmp_path / "kvtier.log", llm_kwargs={"enable_prefix_caching": False},
                           kv_transfer_config=config) as engine:
            for prompt in workload[0]:
                engine.generate([[prompt]])
            assert daemon.wait_for_saves(4 * (1024 // BLOCK))
            daemon.pause()
            with_kvtier, without = [], []
            for question in (1, 2):
                for index, prompt in enumerate(workload[question]):
                    pair = [(engine, with_kvtier), (base, without)]
                    for session, samples in (pair if index % 2 == 0 else reversed(pair)):
                        samples.append(session.generate([[prompt]], max_tokens=4)[0])
            assert [r["token_ids"] for r in with_kvtier] == [r["token_ids"] for r in without]
            # Before: every request waited for the 2 s call deadline. Now a lookup waits a few
            # milliseconds at most, once, and then none does until the daemon answers again.
            slowest, typical = max(r["seconds"] for r in with_kvtier), statistics.median(r["seconds"] for r in without)
            assert slowest < typical + 1.0, (slowest, typical)
            assert sum(r["seconds"] for r in with_kvtier) < 1.5 * sum(r["seconds"] for r in without) + 0.5
            daemon.resume()
            assert wait_until(lambda: engine.generate([[workload[0][0]]])[0]["num_cached_tokens"] > 0, timeout=30), \
                "kvtier was not used again after the daemon resumed"
    finally:
        if daemon.process.poll() is None:
            os.kill(daemon.process.pid, signal.SIGCONT)
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
