"""``kvtier stats``: a running daemon's tiers as a table, as JSON, or refreshed live."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

from kvtier.cli.format import render_chain_stats
from kvtier.client import DaemonClient, DaemonStats
from kvtier.config import load_config
from kvtier.daemon.client_counters import ClientCounters, failure_totals
from kvtier.events.model import PublisherStatus


def stats_to_dict(stats: DaemonStats) -> dict[str, object]:
    return {
        "node": stats.node,
        "version": stats.version,
        "uptime_s": round(stats.uptime_s, 3),
        "active_reservations": stats.active_reservations,
        **stats.chain.to_dict(),
        "publish": dataclasses.asdict(stats.publish) if stats.publish else None,
        "clients": [dataclasses.asdict(client) for client in stats.clients],
        "client_failures": failure_totals(stats.clients),
    }


def render(stats: DaemonStats) -> str:
    header = f"kvtier {stats.version} on {stats.node}, up {stats.uptime_s:.0f}s, {stats.active_reservations} open reservations"
    return header + "\n" + render_chain_stats(stats.chain) + render_clients(stats.clients) + render_publish(stats.publish)


def render_clients(clients: tuple[ClientCounters, ...]) -> str:
    """The connectors' side: who reports, and every failure they counted (summed)."""
    if not clients:
        return ""
    roles = Counter(client.role for client in clients)
    failures = failure_totals(clients)
    counted = ", ".join(f"{name} {value}" for name, value in failures.items()) if failures else "none"
    return (f"\nclients reporting: {len(clients)} ({', '.join(f'{role} {n}' for role, n in sorted(roles.items()))}); "
            f"failures they counted: {counted}")


def render_publish(publish: PublisherStatus | None) -> str:
    if publish is None:
        return ""
    state = "publishing" if publish.publishing else f"NOT publishing ({publish.last_error or 'not connected yet'})"
    age = f"{publish.last_published_age_s:.1f}s ago" if publish.last_published_age_s >= 0 else "never"
    return (f"\nindex {publish.target}: {state}; {publish.pending_events} block events behind, last accepted {age}, "
            f"batch {publish.seq} of session {publish.session[:8]}, {publish.resyncs} re-syncs")


def run_stats(args: argparse.Namespace) -> int:
    if args.address:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
        target: str | Path = args.address
    else:
        token = None
        target = Path(args.socket) if args.socket else load_config().daemon.socket_path
    with DaemonClient(target, token=token, timeout_s=args.timeout) as client:
        iteration = 0
        while True:
            stats = client.stats()
            if args.json:
                print(json.dumps(stats_to_dict(stats), sort_keys=True), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[2J\033[H", end="")
                print(render(stats) + ("\n" if args.watch else ""), flush=True)
            iteration += 1
            if not args.watch or (args.count and iteration >= args.count):
                return 0
            time.sleep(args.interval)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("stats", help="show a running daemon's tiers")
    parser.add_argument("--socket", help="daemon socket (default: the configured daemon.socket_path)")
    parser.add_argument("--address", help="daemon TCP address host:port instead of the socket")
    parser.add_argument("--token-file", help="file holding the bearer token for --address")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per refresh)")
    parser.add_argument("--watch", action="store_true", help="refresh until interrupted")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    parser.add_argument("--count", type=int, default=0, help="with --watch, stop after this many refreshes")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon")
    parser.set_defaults(handler=run_stats)
