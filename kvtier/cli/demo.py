"""``kvtier demo``: the main job on one machine with no GPU, Redis or S3.

A local daemon (host arena + disk tier), a vLLM engine (CPU backend) on a small model generated
on the spot, and a shared-prefix workload: long documents, each asked several questions. Every
prompt runs on an engine with KVTierConnector and on one without, alternating, and the demo
prints their time to first token side by side, checks the outputs are identical, restarts the
daemon halfway (the disk tier brings the prefixes back), and ends with ``kvtier stats``.

vLLM's own prefix cache is off in both engines, so a repeated prefix can only come from kvtier:
the situation kvtier is for (the GPU cache evicted the prefix, or another replica computed it).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

from kvtier.cli.format import render_chain_stats, render_table


def run_demo(args: argparse.Namespace) -> int:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("kvtier demo needs vLLM: run `bash scripts/install_vllm.sh` (CPU build), or try `kvtier demo-chain`")
        return 2
    from kvtier.testing.daemon import LocalDaemon
    from kvtier.testing.engine import EngineSession
    from kvtier.testing.tiny_model import tiny_model_path
    from kvtier.testing.workload import NO_PREFIX_CACHE, kvtier_connector_config, make_workload, paired

    root = Path(args.dir).absolute()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print("making the demo model (a 4-layer Llama with random weights, cached after the first run)...", flush=True)
    model = tiny_model_path()
    workload = make_workload(args.documents, args.doc_tokens, 4, seed=11)
    blocks_per_doc = args.doc_tokens // 32
    daemon = LocalDaemon(root / "daemon", host_capacity="1GiB", disk_capacity="4GiB")
    daemon.start()
    print(f"kvtier daemon on {daemon.socket_path}; starting two vLLM engines (CPU backend)...", flush=True)
    rows, identical = [], True
    try:
        with EngineSession(model, log_path=root / "engine-plain.log", llm_kwargs=NO_PREFIX_CACHE) as plain, \
             EngineSession(model, log_path=root / "engine-kvtier.log", llm_kwargs=NO_PREFIX_CACHE,
                           kv_transfer_config=kvtier_connector_config(daemon.socket_path, retry_after_s=0.2)) as cached:
            phases = [("first question per document (cold)", 0, None),
                      ("second question (prefix from host memory)", 1, None),
                      ("third question, daemon restarted (prefix from disk)", 2, "restart")]
            for name, question, action in phases:
                if action == "restart":
                    daemon.restart()
                measured = paired(cached, plain, workload[question])
                identical &= measured["tokens"] == measured["base_tokens"]
                if question == 0:
                    daemon.wait_for_saves(args.documents * blocks_per_doc)
                without, with_ = statistics.median(measured["base_ms"]), statistics.median(measured["ms"])
                rows.append([name, f"{without:.0f} ms", f"{with_:.0f} ms", f"{without / with_:.1f}x",
                             str(sum(measured["cached"]) // len(measured["cached"]))])
        print()
        print(render_table(["requests", "TTFT without kvtier", "with kvtier", "speedup", "tokens from kvtier"], rows))
        print(f"\noutputs identical with and without kvtier: {'yes' if identical else 'NO'}\n")
        print("$ kvtier stats")
        with daemon.client() as client:
            print(render_chain_stats(client.stats().chain))
    finally:
        daemon.stop()
    return 0 if identical else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="daemon + vLLM engine on a generated model: TTFT with and without kvtier")
    parser.add_argument("--dir", default=".kvtier-demo", help="working folder (deleted and recreated)")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=2048)
    parser.set_defaults(handler=run_demo)
