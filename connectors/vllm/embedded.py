"""The embedded default: a connector with no daemon address starts (or reuses) a local daemon.

The daemon runs in its own session so it outlives the engine: a second engine on the node finds
the blocks the first one saved. Starting is serialised with a file lock, so the scheduler and
the workers (separate processes) never start two daemons on one socket.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from kvtier.client import DaemonClient
from kvtier.config import load_config
from kvtier.daemon.server import socket_is_live
from kvtier.errors import DaemonUnavailableError


def default_socket_path() -> Path:
    return Path(load_config().daemon.socket_path)


def ensure_daemon(socket_path: Path | None, extra_args: list[str], timeout_s: float) -> Path:
    """Return the socket of a live daemon, starting one on the default socket if needed."""
    if socket_path is not None:
        return socket_path  # an operator-run daemon: never start one behind their back
    path = default_socket_path()
    if socket_is_live(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not socket_is_live(path):
            log_path = path.parent / "kvtier-daemon.log"
            with open(log_path, "ab") as log:
                subprocess.Popen(
                    [sys.executable, "-m", "kvtier", "serve", "--socket", str(path), *extra_args],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, env=dict(os.environ),
                )
            _wait_healthy(path, timeout_s, log_path)
    return path


def _wait_healthy(path: Path, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    with DaemonClient(path, timeout_s=1) as client:
        while time.monotonic() < deadline:
            if path.exists() and client.health():
                return
            time.sleep(0.1)
    raise DaemonUnavailableError(f"the local kvtier daemon did not start within {timeout_s:.0f}s; see {log_path}")
