"""A daemon started from inside a pinned engine process belongs to the machine: ``kvtier serve
--detach`` leaves the starter's process tree, CPU pinning and thread settings behind, survives a
vLLM-style kill of that tree, and ``kvtier stop`` stops it cleanly (socket, pid file and arena gone)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from kvtier.cli.serve import daemon_argv
from kvtier.cli.stop import daemon_pid, stop_daemon
from kvtier.config import load_config
from kvtier.daemon.detach import machine_cpus, machine_env, parse_cpu_list
from kvtier.daemon.server import pid_path_for
from kvtier.errors import ConfigError
from kvtier.testing.daemon import free_port
from tests.daemon.conftest import LAYOUT, payload

# A stand-in for vLLM's CPU worker: pinned to one core, with OpenMP settings, it starts the
# daemon the way the connector's embedded default does, then waits to be killed.
PINNED_STARTER = textwrap.dedent(
    """
    import os, sys
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ.update(OMP_NUM_THREADS="1", GOMP_CPU_AFFINITY="0", VLLM_CPU_OMP_THREADS_BIND="0")
    from connectors.vllm.embedded import ensure_daemon
    print(ensure_daemon(None, sys.argv[1:], 60), flush=True)
    import time
    time.sleep(600)
    """
)


def kill_process_tree(pid: int) -> None:
    """What vLLM's shutdown does (``vllm.utils.system_utils.kill_process_tree``)."""
    parent = psutil.Process(pid)
    for child in parent.children(recursive=True):
        os.kill(child.pid, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def runtime(daemon_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An XDG runtime folder of its own, so the default socket is this test's."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(daemon_root))
    monkeypatch.setenv("KVTIER_HOST_SHM_DIR", str(daemon_root))
    monkeypatch.setenv("KVTIER_HOST_CAPACITY", "64MiB")
    monkeypatch.setenv("KVTIER_HOST_SLAB_SIZE", "1MiB")
    monkeypatch.setenv("KVTIER_DISK_PATH", str(daemon_root / "disk"))
    monkeypatch.setenv("KVTIER_DAEMON_METRICS_ADDRESS", f"127.0.0.1:{free_port()}")
    yield daemon_root
    pid = daemon_pid(daemon_root / "kvtier" / "kvtier.sock")
    if pid is not None:  # a failed test left it running
        os.kill(pid, signal.SIGKILL)


def test_embedded_daemon_leaves_the_engine_behind(runtime: Path) -> None:
    socket_path = runtime / "kvtier" / "kvtier.sock"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    starter = subprocess.Popen([sys.executable, "-c", PINNED_STARTER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout.readline().strip() == str(socket_path)
        pid = daemon_pid(socket_path)
        assert pid is not None
        daemon = psutil.Process(pid)
        assert daemon.pid not in {p.pid for p in psutil.Process(starter.pid).children(recursive=True)}
        assert set(daemon.cpu_affinity()) == machine_cpus()
        assert not {"OMP_NUM_THREADS", "GOMP_CPU_AFFINITY", "VLLM_CPU_OMP_THREADS_BIND"} & set(daemon.environ())
        assert os.getsid(pid) == pid  # a session of its own: no terminal's signals reach it
        from kvtier.client import DaemonClient

        with DaemonClient(socket_path) as client:
            reg = client.register_layout(LAYOUT)
            block = b"\x01" * 16
            client.write_blocks(reg.layout_id, {block: payload(block)})
            kill_process_tree(starter.pid)  # the engine shuts down the vLLM way
            starter.wait()
            assert daemon.is_running() and daemon.status() != psutil.STATUS_ZOMBIE
            assert client.read_blocks(reg.layout_id, [block]) == [payload(block)]  # host tier intact
    finally:
        if starter.poll() is None:
            starter.kill()
    arena = next(runtime.glob("kvtier-*-arena"))
    assert stop_daemon(socket_path, timeout_s=30)
    assert not socket_path.exists() and not pid_path_for(socket_path).exists() and not arena.exists()
    assert not stop_daemon(socket_path, timeout_s=5)  # nothing left to stop


def test_detach_reports_a_daemon_that_cannot_start(runtime: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kvtier", "serve", "--detach", "--socket", str(runtime / "s.sock"),
                             "--host-capacity", "1PiB"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot reserve" in result.stderr or "host" in result.stderr


def test_stop_ignores_a_pid_file_naming_another_program(runtime: Path) -> None:
    socket_path = runtime / "x.sock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_path_for(socket_path).write_text(f"{other.pid}\n")
        assert daemon_pid(socket_path) is None
        assert not stop_daemon(socket_path, timeout_s=1)
        time.sleep(0.1)
        assert other.poll() is None
    finally:
        other.kill()


def test_cpu_lists_and_environment() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    for bad in ("a", "3-1", "-1"):
        with pytest.raises(ConfigError):
            parse_cpu_list(bad)
    assert machine_cpus() >= set(os.sched_getaffinity(0))
    env = machine_env({"OMP_NUM_THREADS": "1", "KMP_AFFINITY": "x", "VLLM_CPU_OMP_THREADS_BIND": "0", "PATH": "/bin",
                       "KVTIER_HOST_CAPACITY": "1GiB", "AWS_REGION": "us-east-1"})
    assert env == {"PATH": "/bin", "KVTIER_HOST_CAPACITY": "1GiB", "AWS_REGION": "us-east-1"}
    assert load_config(env={"KVTIER_DAEMON_CPU_AFFINITY": "0-1"}).daemon.cpu_affinity == "0-1"
    with pytest.raises(ConfigError, match="cpu_affinity"):
        load_config(env={"KVTIER_DAEMON_CPU_AFFINITY": "most"})


def test_launcher_flags_are_not_passed_to_the_daemon() -> None:
    argv = ["-v", "serve", "--detach", "--socket", "/s", "--log-file", "/l", "--start-timeout=5", "--host-capacity", "1GiB"]
    assert daemon_argv(argv) == ["-v", "serve", "--socket", "/s", "--host-capacity", "1GiB"]
