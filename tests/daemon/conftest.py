"""A real daemon process (``python -m kvtier serve``) on a temporary socket, for the daemon tests."""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.blocks import KVLayout
from kvtier.testing.daemon import LocalDaemon, free_port

__all__ = ["LAYOUT", "DaemonProcess", "free_port", "payload", "start_on_tcp"]

LAYOUT = KVLayout(model="test/tiny", dtype="float16", num_layers=2, num_kv_heads=2, head_size=64, block_size=16)  # 8 KiB blocks


def payload(block_hash: bytes) -> bytes:
    """The bytes a test stores under ``block_hash``: distinct per block, reproducible."""
    return random.Random(block_hash).randbytes(LAYOUT.block_nbytes)


TEST_ENV = {
    "KVTIER_HOST_SLAB_SIZE": "1MiB",
    "KVTIER_CHAIN_LEASE_TTL_S": "3",
    "KVTIER_DAEMON_RESERVATION_TTL_S": "3",
    "KVTIER_DAEMON_REAPER_INTERVAL_S": "0.2",
    "KVTIER_DAEMON_GRACE_PERIOD_S": "2",
}


class DaemonProcess(LocalDaemon):
    """A daemon with short TTLs and reaper interval, so expiry tests run in seconds."""

    def __init__(self, root: Path, extra_env: dict[str, str] | None = None, extra_args: list[str] | None = None) -> None:
        super().__init__(root, args=list(extra_args or []), env={**TEST_ENV, **(extra_env or {})})


def start_on_tcp(root: Path, extra_env: dict[str, str] | None = None, attempts: int = 3) -> tuple[DaemonProcess, int]:
    """A daemon listening on ``127.0.0.1:<a free port>`` as well as its socket, and that port.

    A port found free can be taken (by any process's outgoing connection) before the daemon binds
    it; the daemon then exits with "Failed to bind" and this tries another port."""
    for attempt in range(attempts):
        port = free_port()
        daemon = DaemonProcess(root, extra_env=extra_env, extra_args=["--tcp", f"127.0.0.1:{port}"])
        try:
            daemon.start()
            return daemon, port
        except RuntimeError as exc:
            if "Failed to bind" not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


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
