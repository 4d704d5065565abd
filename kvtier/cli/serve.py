"""``kvtier serve``: run the node daemon (embedded default: host arena + local disk, no S3).

``--detach`` starts the same daemon in the background, owned by the machine rather than by the
caller (``kvtier.daemon.detach``): it returns once the daemon answers, and the daemon outlives the
process that started it (a vLLM engine, in the embedded default). ``kvtier stop`` stops it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from kvtier.config import load_config
from kvtier.daemon.detach import start_detached
from kvtier.daemon.server import run_daemon

# flag -> (section, key)
_FLAG_SETTINGS = {
    "socket": ("daemon", "socket_path"),
    "tcp": ("daemon", "tcp_address"),
    "metrics": ("daemon", "metrics_address"),
    "cpu_affinity": ("daemon", "cpu_affinity"),
    "node_name": ("daemon", "node"),
    "index": ("publish", "index"),
    "host_capacity": ("host", "capacity"),
    "disk_path": ("disk", "path"),
    "disk_capacity": ("disk", "capacity"),
    "s3_bucket": ("s3", "bucket"),
    "s3_prefix": ("s3", "prefix"),
    "s3_endpoint_url": ("s3", "endpoint_url"),
    "s3_region": ("s3", "region"),
    "eviction": ("chain", "eviction"),
    "write_mode": ("chain", "write_mode"),
}
_LAUNCHER_ONLY = {"--detach": 0, "--log-file": 1, "--start-timeout": 1}  # flag -> values it takes


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for flag, (section, key) in _FLAG_SETTINGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if args.no_metrics:
        overrides.setdefault("daemon", {})["metrics_address"] = None
    if args.no_disk:
        overrides.setdefault("disk", {})["enabled"] = False
    if args.s3_bucket:
        overrides.setdefault("s3", {})["enabled"] = True
    return overrides


def daemon_argv(argv: list[str]) -> list[str]:
    """The ``kvtier ...`` arguments of the daemon a ``--detach`` launcher starts: its own minus
    the launcher's flags."""
    out: list[str] = []
    skip = 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in _LAUNCHER_ONLY:
            skip = _LAUNCHER_ONLY[name] if "=" not in arg else 0
            continue
        out.append(arg)
    return out


def run_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=overrides_from(args))  # a bad setting fails here, in the foreground
    if args.detach:
        socket_path = Path(config.daemon.socket_path)
        log_path = Path(args.log_file) if args.log_file else socket_path.with_name("kvtier-daemon.log")
        command = [sys.executable, "-m", "kvtier", *daemon_argv(args.argv)]
        pid = start_detached(command, socket_path=socket_path, log_path=log_path, timeout_s=args.start_timeout)
        print(f"kvtier daemon ready on {socket_path} (pid {pid}, log {log_path})", flush=True)
        return 0
    logging.getLogger("kvtier").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    run_daemon(config)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the node daemon",
        description="Run the kvtier node daemon. Settings come from --config (TOML), KVTIER_<SECTION>_<KEY> "
        "environment variables, then these flags.",
    )
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--socket", help="Unix socket for local clients")
    parser.add_argument("--tcp", help="also listen on host:port (needs KVTIER_DAEMON_AUTH_TOKEN or mutual TLS)")
    parser.add_argument("--metrics", help="Prometheus metrics on host:port (default 127.0.0.1:9400)")
    parser.add_argument("--no-metrics", action="store_true", help="do not serve metrics")
    parser.add_argument("--node-name", help="this node's name in the index (default: the host name; on Kubernetes the node name)")
    parser.add_argument("--index", help="publish to this index: `kvtier index serve` host:port, or redis://... (default: "
                        "the daemon's own index, on its socket)")
    parser.add_argument("--host-capacity", help="host arena size, e.g. 32GiB (default: a quarter of free memory)")
    parser.add_argument("--disk-path", help="disk tier folder")
    parser.add_argument("--disk-capacity", help="disk tier size, e.g. 500GiB")
    parser.add_argument("--no-disk", action="store_true", help="no disk tier")
    parser.add_argument("--s3-bucket", help="enable the S3 tier with this bucket")
    parser.add_argument("--s3-prefix")
    parser.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (MinIO, S3 Express...)")
    parser.add_argument("--s3-region")
    parser.add_argument("--eviction", choices=["lru", "s3fifo"])
    parser.add_argument("--write-mode", choices=["write-back", "write-through"])
    parser.add_argument("--cpu-affinity", help="CPUs to run on: inherit (default), all, or a list such as 0-3,8")
    parser.add_argument("--detach", action="store_true",
                        help="start the daemon in the background, detached from this process, and return once it serves")
    parser.add_argument("--log-file", help="with --detach: the daemon's log (default: kvtier-daemon.log beside the socket)")
    parser.add_argument("--start-timeout", type=float, default=60.0, help="with --detach: seconds to wait for the daemon")
    parser.set_defaults(handler=run_serve)
