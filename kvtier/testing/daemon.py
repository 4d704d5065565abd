"""A ``kvtier serve`` process on a private socket, for tests, benchmarks and the demo.

``start`` waits until the daemon answers its health check; ``stop`` sends a signal (SIGTERM: a
graceful stop that flushes write-back; SIGKILL: a crash) and waits. Start and stop again to
restart it on the same folders, as an operator would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.client import DaemonClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true; False if it is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@dataclass
class LocalDaemon:
    root: Path  # socket, disk tier and log live here; keep the path short (Unix sockets: 107 chars)
    args: list[str] = field(default_factory=list)  # extra `kvtier serve` flags
    env: dict[str, str] = field(default_factory=dict)  # extra KVTIER_* settings
    host_capacity: str = "8MiB"
    disk_capacity: str = "256MiB"
    metrics_port: int = field(default_factory=free_port)
    socket: Path | None = None  # default: root / "kvtier.sock"
    process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.socket or self.root / "kvtier.sock"

    @property
    def disk_path(self) -> Path:
        return self.root / "disk"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "kvtier", "serve",
            "--socket", str(self.socket_path),
            "--host-capacity", self.host_capacity,
            "--disk-path", str(self.disk_path),
            "--disk-capacity", self.disk_capacity,
            "--metrics", f"127.0.0.1:{self.metrics_port}",
            *self.args,
        ]

    def start(self, wait: bool = True) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "KVTIER_HOST_SHM_DIR": str(self.root), **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with DaemonClient(self.socket_path, timeout_s=1) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
                if self.socket_path.exists() and client.health():
                    return
                time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def pause(self) -> None:
        """SIGSTOP the daemon and wait until it is stopped (signals arrive asynchronously): a
        daemon that takes calls but never answers them."""
        import psutil

        self.process.send_signal(signal.SIGSTOP)
        process = psutil.Process(self.process.pid)
        if not wait_until(lambda: process.status() == psutil.STATUS_STOPPED, timeout=10, interval=0.01):
            raise RuntimeError(f"daemon {self.process.pid} did not stop")

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def wait_for_demotions(self, timeout: float = 60) -> bool:
        """Wait until nothing waits for demotion; False on timeout."""
        return self.wait_for_saves(0, timeout)

    def wait_for_saves(self, min_host_blocks: int, timeout: float = 60) -> bool:
        """See :func:`wait_for_saves`."""
        return wait_for_saves(self.socket_path, min_host_blocks, timeout)

    def client(self, **kwargs) -> DaemonClient:
        return DaemonClient(self.socket_path, **kwargs)


def wait_for_saves(socket_path: Path, min_host_blocks: int, timeout: float = 60) -> bool:
    """Wait until the daemon on ``socket_path`` holds ``min_host_blocks`` in host memory and
    nothing waits for demotion (an engine's saves are asynchronous). False on timeout."""
    deadline = time.monotonic() + timeout
    with DaemonClient(socket_path) as client:
        while time.monotonic() < deadline:
            stats = client.stats().chain
            if stats.tiers[0].blocks >= min_host_blocks and stats.pending_demotions == 0:
                return True
            time.sleep(0.1)
    return False
