"""The embedded default: a connector with no daemon address starts (or reuses) a local daemon.

The daemon is started with ``kvtier serve --detach``, so it belongs to the machine, not to the
engine: it is no descendant of any vLLM process (vLLM's shutdown kills those), it runs on every
CPU the machine allows with none of the worker's thread settings (the worker pins itself to a
core), and the next engine on the node finds it, host tier and all. ``kvtier stop`` stops it.
Starting is serialised with a file lock, so the scheduler and the workers (separate processes)
never start two daemons on one socket.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

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
            start_embedded_daemon(path, extra_args, timeout_s)
    return path


def start_embedded_daemon(path: Path, extra_args: list[str], timeout_s: float) -> None:
    command = [sys.executable, "-m", "kvtier", "serve", "--detach", "--socket", str(path), "--cpu-affinity", "all",
               "--start-timeout", str(timeout_s), *extra_args]
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s + 10)
    except subprocess.TimeoutExpired:
        raise DaemonUnavailableError(f"starting the local kvtier daemon took over {timeout_s:.0f}s") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()[-2000:]
        raise DaemonUnavailableError(f"the local kvtier daemon did not start:\n{detail}")
