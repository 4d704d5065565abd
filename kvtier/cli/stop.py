"""``kvtier stop``: stop the daemon serving a socket, gracefully (as SIGTERM does: it stops
taking calls, flushes its write-back queue and removes its socket and arena), and wait for it.

The daemon is found by the pid file beside its socket (``<socket>.pid``); the process must still
be a ``kvtier serve`` on that socket, so a stale file naming a reused pid signals nobody.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from kvtier.config import load_config
from kvtier.daemon.server import pid_path_for, socket_is_live
from kvtier.errors import DaemonUnavailableError


def daemon_pid(socket_path: Path) -> int | None:
    """The pid of the live ``kvtier serve`` process of ``socket_path``, or None if there is none."""
    try:
        pid = int(pid_path_for(socket_path).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    words = [word.decode(errors="replace") for word in cmdline if word]
    if "serve" not in words or not any("kvtier" in word for word in words):
        return None  # the pid was reused by another program
    return pid


def stop_daemon(socket_path: Path, timeout_s: float) -> bool:
    """SIGTERM the daemon of ``socket_path`` and wait until it exits. False if none was running."""
    pid = daemon_pid(socket_path)
    if pid is None:
        if socket_is_live(socket_path):
            raise DaemonUnavailableError(f"a daemon serves {socket_path} but {pid_path_for(socket_path)} does not name it; "
                                         "stop it with its process manager")
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or daemon_pid(socket_path) is None:
            return True
        time.sleep(0.05)
    raise DaemonUnavailableError(f"the daemon (pid {pid}) did not stop within {timeout_s:.0f}s; it may still be "
                                 "flushing to disk or S3 (daemon.flush_timeout_s)")


def run_stop(args: argparse.Namespace) -> int:
    socket_path = Path(args.socket) if args.socket else Path(load_config(args.config).daemon.socket_path)
    if stop_daemon(socket_path, args.timeout):
        print(f"kvtier daemon on {socket_path} stopped")
    else:
        print(f"no kvtier daemon on {socket_path}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("stop", help="stop a running daemon gracefully",
                                   description="Stop the daemon of a socket (default: the configured one) and wait for it.")
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--socket", help="the daemon's Unix socket")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait (default 90)")
    parser.set_defaults(handler=run_stop)
