"""A promotion in progress: blocks being brought into host memory, and how far the leading run has
got (only a leading run is loadable: a request's prefix stops at its first missing block).

Each block is promoted on the chain's promotion threads and settles as brought in or not; the
promotion is finished when every block settled or the leading run met a block that could not be
brought in (nothing after it can extend the run). :meth:`Promotion.wait` lets a caller wait under
a rule of its own, re-evaluated each time a block settles, such as a loss budget: keep waiting
while the time spent is paid for by the blocks that arrived.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class Promotion:
    def __init__(self, count: int) -> None:
        self.count = count
        self._settled: list[bool | None] = [None] * count
        self._leading = 0
        self._stopped = False  # the leading run met a block that was not brought in
        self._cond = threading.Condition()

    @property
    def leading(self) -> int:
        """Leading blocks brought into host memory so far."""
        return self._leading

    @property
    def finished(self) -> bool:
        return self._stopped or self._leading == self.count

    def extend(self, count: int) -> int:
        """Add ``count`` blocks after the current ones (brought in by another source, such as a
        peer); returns the index of the first. Call before anyone waits on the promotion."""
        with self._cond:
            first = self.count
            self.count += count
            self._settled.extend([None] * count)
            self._cond.notify_all()
            return first

    def settle(self, index: int, brought_in: bool) -> None:
        with self._cond:
            self._settled[index] = brought_in
            while self._leading < self.count and self._settled[self._leading]:
                self._leading += 1
            if self._leading < self.count and self._settled[self._leading] is False:
                self._stopped = True
            self._cond.notify_all()

    def result(self, timeout: float | None = None) -> int:
        """Wait until finished; the leading run. Raises ``TimeoutError`` after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished, timeout):
                raise TimeoutError(f"promotion not finished after {timeout}s ({self._leading} of {self.count} blocks)")
            return self._leading

    def wait(self, remaining_s: Callable[[float, int], float]) -> bool:
        """Wait until finished or until ``remaining_s(elapsed_s, leading)`` is no longer positive
        (it is asked again whenever a block settles). Returns whether it finished."""
        started = time.monotonic()
        with self._cond:
            while not self.finished:
                left = remaining_s(time.monotonic() - started, self._leading)
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


@dataclass(frozen=True, slots=True)
class FetchBudget:
    """How long a request waiting for a promotion may wait: while the time spent, less
    ``block_s`` for every leading block brought in (what computing it would have cost), stays
    under ``allowance_s``. The connector derives both from measured rates."""

    block_s: float
    allowance_s: float

    def remaining_s(self, elapsed_s: float, got: int) -> float:
        return self.allowance_s + got * self.block_s - elapsed_s
