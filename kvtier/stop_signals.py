"""Running a service until SIGTERM or SIGINT: the one loop `kvtier serve` and `kvtier index
serve` share."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Yield an event set by SIGTERM or SIGINT; the previous handlers are back on exit."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_stop(stop: threading.Event) -> None:
    """Block until ``stop`` is set, waking now and then so that signals are handled promptly."""
    while not stop.wait(0.5):
        pass
