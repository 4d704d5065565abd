"""vLLM's OpenAI server (API server, engine core and worker processes, the worker pinned to a
core) with KVTierConnector, driven by the ``openai`` client with concurrent requests that share
long prefixes, on the embedded default and with an operator-run daemon. A server fills kvtier and
is shut down; a fresh server gets the shared prefixes from kvtier (counted by vLLM's own
``external_prefix_cache_hits`` metric), and every output equals that of an engine without kvtier.
vLLM's own prefix cache is on, as it is by default."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.cli.stop import daemon_pid, stop_daemon
from kvtier.testing.daemon import LocalDaemon, free_port, wait_for_saves
from kvtier.testing.server import OpenAIServer
from kvtier.testing.workload import kvtier_connector_config, make_workload
from tests.vllm.conftest import AS_USERS_RUN_IT, EngineRun, run_engine_subprocess

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCK = 32
DOC_TOKENS = 2500
MAX_TOKENS = 6
WORKLOAD = make_workload(documents=2, doc_tokens=DOC_TOKENS, questions=3, seed=21)  # [question][document]
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--block-size", str(BLOCK),
               "--kv-cache-memory-bytes", str(512 * 1024 * 1024), "--max-num-batched-tokens", "2048", "--seed", "0"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openai")


@pytest.fixture(scope="module")
def reference(wide_model: Path, workdir: Path) -> EngineRun:
    """Greedy outputs without kvtier, one batch per question wave."""
    return run_engine_subprocess(wide_model, WORKLOAD, workdir=workdir, name="reference", env=AS_USERS_RUN_IT,
                                 max_tokens=MAX_TOKENS, llm_kwargs={"max_model_len": 4096, "kv_cache_memory_bytes": 512 * 1024 * 1024,
                                                                    "max_num_batched_tokens": 2048})


async def complete_all(server: OpenAIServer, prompts: list[list[int]]) -> list[list[int]]:
    """All prompts at once, streamed: the token ids each completion streamed, in order."""
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(prompt: list[int]) -> list[int]:
        stream = await client.completions.create(model=server.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        tokens: list[int] = []
        chunks = 0
        async for chunk in stream:
            chunks += 1
            tokens.extend(getattr(chunk.choices[0], "token_ids", None) or [])
        assert chunks >= MAX_TOKENS, "tokens did not arrive one by one"
        return tokens

    try:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await client.close()


def serve(wide_model: Path, workdir: Path, name: str, config: dict, env: dict, args: tuple[str, ...] = ()) -> OpenAIServer:
    return OpenAIServer(wide_model, log_path=workdir / f"{name}.log", args=[*SERVER_ARGS, *args], kv_transfer_config=config,
                        env={**AS_USERS_RUN_IT, **env}).wait_ready()


@pytest.fixture
def operator_daemon(workdir: Path) -> Iterator[LocalDaemon]:
    root = Path(tempfile.mkdtemp(prefix="kvo-", dir="/tmp"))
    daemon = LocalDaemon(root, host_capacity="1GiB", disk_capacity="2GiB")
    daemon.start()
    yield daemon
    daemon.stop()
    shutil.copy(daemon.log_path, workdir / "operator-daemon.log")  # kept with the servers' logs
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def embedded_runtime() -> Iterator[dict[str, str]]:
    runtime = Path(tempfile.mkdtemp(prefix="kvr-", dir="/tmp"))
    yield {"XDG_RUNTIME_DIR": str(runtime), "XDG_CACHE_HOME": str(runtime / "cache"), "KVTIER_HOST_CAPACITY": "1GiB",
           "KVTIER_HOST_SHM_DIR": str(runtime), "KVTIER_DAEMON_METRICS_ADDRESS": f"127.0.0.1:{free_port()}"}
    socket_path = runtime / "kvtier" / "kvtier.sock"
    if not stop_daemon(socket_path, timeout_s=60) and (pid := daemon_pid(socket_path)) is not None:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(runtime, ignore_errors=True)


def fill_then_fresh_server(wide_model: Path, workdir: Path, name: str, config: dict, env: dict, reference: EngineRun,
                           drain: bool = False) -> None:
    """Fill kvtier from one server, then read it from a fresh one. Saves are asynchronous and
    vLLM's default shutdown (``--shutdown-timeout 0``) aborts those in flight: with ``drain`` the
    fill server is stopped at once with a drain timeout (vLLM then waits for the blocks the
    connector holds until they are copied out), else the test waits for the saves first."""
    shared = 2 * (DOC_TOKENS // BLOCK) * BLOCK
    socket_path = Path(config["kv_connector_extra_config"].get("socket_path") or Path(env["XDG_RUNTIME_DIR"]) / "kvtier" / "kvtier.sock")
    with serve(wide_model, workdir, f"{name}-fill", config, env, ("--shutdown-timeout", "60") if drain else ()) as server:
        assert asyncio.run(complete_all(server, WORKLOAD[0])) == reference.token_ids(0)
        # Concurrent requests on the same server: the shared prefix comes from vLLM's own cache
        # or from kvtier; either way the outputs are the engine's.
        assert asyncio.run(complete_all(server, WORKLOAD[1])) == reference.token_ids(1)
        if not drain:
            assert wait_for_saves(socket_path, shared // BLOCK, timeout=120), "the fill server's saves did not all reach the daemon"
    # after a drained shutdown no engine is left to save anything: what is missing now is lost
    assert wait_for_saves(socket_path, shared // BLOCK, timeout=120), "saves were lost at the fill server's shutdown"
    with serve(wide_model, workdir, f"{name}-fresh", config, env) as server:
        assert asyncio.run(complete_all(server, WORKLOAD[2])) == reference.token_ids(2)
        hits = server.metric("vllm:external_prefix_cache_hits_total")
        log = server.log()
    print(f"{name}: {hits:.0f} of {shared} shared prompt tokens came from kvtier")  # shown with pytest -s
    assert hits >= 0.9 * shared, f"{hits} of {shared} shared prompt tokens came from kvtier"
    failures = [line for line in log.splitlines() if "is late" in line or "unreachable" in line]
    assert not failures, failures[:5]


def test_openai_server_on_the_embedded_default(wide_model: Path, workdir: Path, reference: EngineRun, embedded_runtime) -> None:
    fill_then_fresh_server(wide_model, workdir, "embedded", kvtier_connector_config(None), embedded_runtime, reference)


def test_openai_server_with_an_operator_run_daemon(wide_model: Path, workdir: Path, reference: EngineRun,
                                                   operator_daemon: LocalDaemon) -> None:
    fill_then_fresh_server(wide_model, workdir, "operator", kvtier_connector_config(operator_daemon.socket_path), {}, reference,
                           drain=True)
