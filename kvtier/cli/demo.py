"""``kvtier demo``: the main job on one machine with no GPU, Redis or S3.

A vLLM engine (CPU backend) with KVTierConnector on the embedded default (the connector starts
the node daemon itself: host arena + disk tier), one without, a small model generated on the
spot, and a shared-prefix workload: long documents, each asked several questions. Every prompt
runs on both engines, alternating, and the demo prints their time to first token side by side,
checks the outputs are identical, restarts the daemon halfway (``kvtier stop``; the connector
starts it again and the disk tier brings the prefixes back), and ends with ``kvtier stats``.

vLLM's own prefix cache is off in both engines, so a repeated prefix can only come from kvtier:
the situation kvtier is for (the GPU cache evicted the prefix, or another replica computed it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
from pathlib import Path

from kvtier.cli.format import render_table
from kvtier.cli.stats import render as render_stats


def demo_environment(root: Path) -> dict[str, str]:
    """Where the demo's embedded daemon lives: a private runtime folder (socket, log), disk tier
    and arena, so it never touches a daemon the user runs."""
    from kvtier.testing.daemon import free_port

    return {"XDG_RUNTIME_DIR": str(root / "run"), "XDG_CACHE_HOME": str(root / "cache"), "KVTIER_HOST_CAPACITY": "1GiB",
            "KVTIER_DISK_CAPACITY": "4GiB", "KVTIER_DAEMON_METRICS_ADDRESS": f"127.0.0.1:{free_port()}"}


def run_demo(args: argparse.Namespace) -> int:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("kvtier demo needs vLLM: run `bash scripts/install_vllm.sh` (CPU build), or try `kvtier demo-chain`")
        return 2
    from connectors.vllm.embedded import default_socket_path, ensure_daemon
    from kvtier.cli.stop import stop_daemon
    from kvtier.client import DaemonClient
    from kvtier.testing.daemon import wait_until
    from kvtier.testing.engine import EngineSession
    from kvtier.testing.tiny_model import tiny_model_path
    from kvtier.testing.workload import NO_PREFIX_CACHE, kvtier_connector_config, make_workload, paired

    root = Path(args.dir).absolute()
    shutil.rmtree(root, ignore_errors=True)
    (root / "run").mkdir(parents=True)
    env = demo_environment(root)
    os.environ.update(env)  # this process finds the same daemon (kvtier stats, kvtier stop)
    print("making the demo model (a 4-layer Llama with random weights, cached after the first run)...", flush=True)
    model = tiny_model_path()
    workload = make_workload(args.documents, args.doc_tokens, 4, seed=11)
    blocks_per_doc = args.doc_tokens // 32
    socket_path = default_socket_path()
    print("starting two vLLM engines (CPU backend); the one with kvtier starts the daemon (embedded default)...", flush=True)
    rows, identical = [], True
    try:
        with EngineSession(model, log_path=root / "engine-plain.log", llm_kwargs=NO_PREFIX_CACHE) as plain, \
             EngineSession(model, log_path=root / "engine-kvtier.log", llm_kwargs=NO_PREFIX_CACHE, env=env,
                           kv_transfer_config=kvtier_connector_config(None, retry_after_s=0.2)) as cached:
            print(f"kvtier daemon on {socket_path}\n", flush=True)
            phases = [("first question per document (cold)", 0, None),
                      ("second question (prefix from host memory)", 1, None),
                      ("third question, daemon restarted (prefix from disk)", 2, "restart")]
            for name, question, action in phases:
                if action == "restart":
                    stop_daemon(socket_path, timeout_s=120)  # flushes write-back to disk
                    ensure_daemon(None, [], 60)  # what the connector does on its next connect
                    with DaemonClient(socket_path) as client:  # past the connector's back-off
                        wait_until(lambda: client.stats().chain.tiers[0].blocks >= 0, timeout=5)
                    cached.generate([[workload[3][0][:64]]], max_tokens=1)  # reconnects (a short, unrelated prompt)
                measured = paired(cached, plain, workload[question])
                identical &= measured["tokens"] == measured["base_tokens"]
                if question == 0:
                    with DaemonClient(socket_path) as client:
                        wait_until(lambda: client.stats().chain.tiers[0].blocks >= args.documents * blocks_per_doc
                                   and client.stats().chain.pending_demotions == 0, timeout=60)
                without, with_ = statistics.median(measured["base_ms"]), statistics.median(measured["ms"])
                rows.append([name, f"{without:.0f} ms", f"{with_:.0f} ms", f"{without / with_:.1f}x",
                             str(sum(measured["cached"]) // len(measured["cached"]))])
        print(render_table(["requests", "TTFT without kvtier", "with kvtier", "speedup", "tokens from kvtier"], rows))
        print(f"\noutputs identical with and without kvtier: {'yes' if identical else 'NO'}\n")
        print("the daemon outlived the engine that started it; $ kvtier stats")
        with DaemonClient(socket_path) as client:
            print(render_stats(client.stats()))
    finally:
        stop_daemon(socket_path, timeout_s=120)
    return 0 if identical else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="daemon + vLLM engine on a generated model: TTFT with and without kvtier")
    parser.add_argument("--dir", default=".kvtier-demo", help="working folder (deleted and recreated)")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=2048)
    parser.set_defaults(handler=run_demo)
