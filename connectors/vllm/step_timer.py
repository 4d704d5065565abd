"""Time spent inside the connector's hooks on vLLM's step loop (what the connector adds to a step).

Always on (two ``perf_counter`` calls per hook). With ``KVTIER_CONNECTOR_PROFILE=PATH`` set,
each process writes ``PATH.<pid>.json`` at exit: ``{hook: [calls, seconds, slowest call's
seconds, CPU seconds]}`` (plus ``idle_lookup_wait``, time inside hooks spent waiting while the engine was
idle), which ``benchmarks/step_cost.py`` compares with the engine's step time.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
TIMES: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
#: Part of the hook time spent waiting for a lookup while the engine had nothing scheduled
#: (it delays no request; reported apart so the step overhead is not overstated).
IDLE_WAIT = "idle_lookup_wait"


def record_idle_wait(seconds: float) -> None:
    entry = TIMES[IDLE_WAIT]
    entry[0] += 1
    entry[1] += seconds
    entry[2] = max(entry[2], seconds)


def timed(method: F) -> F:
    """Time each call of ``method``; when profiling, also the calling thread's CPU time in it
    (the rest of the wall time is waiting: for the GIL, a lock, the OS)."""
    entry = TIMES[method.__name__]
    clock = time.perf_counter
    cpu = time.thread_time if os.environ.get("KVTIER_CONNECTOR_PROFILE") else None
    if cpu is not None:
        entry.append(0.0)

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        start_cpu = cpu() if cpu is not None else 0.0
        try:
            return method(*args, **kwargs)
        finally:
            took = clock() - start
            entry[0] += 1
            entry[1] += took
            if took > entry[2]:
                entry[2] = took
            if cpu is not None:
                entry[3] += cpu() - start_cpu

    return wrapper  # type: ignore[return-value]


def _dump() -> None:
    path = os.environ.get("KVTIER_CONNECTOR_PROFILE")
    if path and TIMES:
        with open(f"{path}.{os.getpid()}.json", "w") as out:
            json.dump(dict(TIMES), out)


atexit.register(_dump)
