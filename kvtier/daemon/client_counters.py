"""What the daemon's clients count on their side, so ``kvtier stats`` shows it.

The vLLM connector counts its lookups, loads, saves and failures (a corrupt block caught on load,
a daemon that was unreachable or late, a save that failed...) in its own process, where only
vLLM's connector stats would show them. It reports those lifetime counters every few seconds
(``ReportCounters``); the daemon keeps each client's latest report and ``Stats`` returns them.

Invariants: a report replaces the client's previous one (counters are lifetime totals, so a
lost report loses nothing); at most :data:`MAX_CLIENTS` clients are kept, the least recently
reported dropped first; names and values are checked before anything is stored.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kvtier.errors import InvalidRequestError

MAX_CLIENTS = 256
MAX_COUNTERS = 256
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class ClientCounters:
    client_id: str
    role: str
    counters: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # the counters that count failures
    age_s: float = 0.0  # since the report arrived


def failure_totals(clients: tuple[ClientCounters, ...] | list[ClientCounters]) -> dict[str, int]:
    """Each failure counter summed over the clients, zeros left out."""
    totals: dict[str, int] = {}
    for client in clients:
        for name, value in client.failures.items():
            if value:
                totals[name] = totals.get(name, 0) + value
    return dict(sorted(totals.items()))


def _checked(counters: Mapping[str, int], what: str) -> dict[str, int]:
    if len(counters) > MAX_COUNTERS:
        raise InvalidRequestError(f"at most {MAX_COUNTERS} {what} per report, got {len(counters)}")
    for name, value in counters.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(f"{what} names are lowercase identifiers of at most 64 characters, got {name!r}")
        if type(value) is not int or not 0 <= value < 1 << 64:
            raise InvalidRequestError(f"{what} {name!r} must be an unsigned 64-bit integer, got {value!r}")
    return dict(counters)


class ClientCounterBoard:
    """The latest counters of each reporting client. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._reports: OrderedDict[str, tuple[float, ClientCounters]] = OrderedDict()

    def report(self, client_id: str, role: str, counters: Mapping[str, int], failures: Mapping[str, int]) -> None:
        if not role or len(role) > 64:
            raise InvalidRequestError("role must be a non-empty string of at most 64 characters")
        report = ClientCounters(client_id, role, _checked(counters, "counter"), _checked(failures, "failure counter"))
        with self._lock:
            self._reports.pop(client_id, None)
            self._reports[client_id] = (self._clock(), report)
            while len(self._reports) > MAX_CLIENTS:
                self._reports.popitem(last=False)

    def snapshot(self) -> list[ClientCounters]:
        """Every kept report, oldest first, with its age."""
        now = self._clock()
        with self._lock:
            reports = list(self._reports.values())
        return [ClientCounters(r.client_id, r.role, r.counters, r.failures, max(now - at, 0.0)) for at, r in reports]
