"""A real daemon process (``python -m kvtier serve``) on a temporary socket, for the daemon tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvtier.blocks import KVLayout
from kvtier.client import DaemonClient

LAYOUT = KVLayout(model="test/tiny", dtype="float16", num_layers=2, num_kv_heads=2, head_size=64, block_size=16)  # 8 KiB blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DaemonProcess:
    """One daemon process; ``start`` and ``stop`` may be called again to restart it on the same folders."""

    root: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.root / "kvtier.sock"

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
            "--host-capacity", "8MiB",
            "--disk-path", str(self.disk_path),
            "--disk-capacity", "256MiB",
            "--metrics", f"127.0.0.1:{self.metrics_port}",
            *self.extra_args,
        ]

    def start(self, wait: bool = True) -> None:
        env = dict(os.environ)
        env.update({
            "KVTIER_HOST_SLAB_SIZE": "1MiB",
            "KVTIER_HOST_SHM_DIR": str(self.root),
            "KVTIER_CHAIN_LEASE_TTL_S": "3",
            "KVTIER_DAEMON_RESERVATION_TTL_S": "3",
            "KVTIER_DAEMON_REAPER_INTERVAL_S": "0.2",
            "KVTIER_DAEMON_GRACE_PERIOD_S": "2",
        })
        env.update(self.extra_env)
        log = open(self.log_path, "ab")
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def client(self, **kwargs) -> DaemonClient:
        return DaemonClient(self.socket_path, **kwargs)


@pytest.fixture
def daemon_root() -> Iterator[Path]:
    # Short path: Unix socket paths are limited to 107 characters.
    root = Path(tempfile.mkdtemp(prefix="kvt-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemon(daemon_root: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(daemon_root)
    process.start()
    yield process
    if process.process and process.process.poll() is None:
        process.stop()
