"""S3-FIFO eviction (Yang et al., SOSP 2023): scan-resistant, with FIFO queues only.

New blocks enter a small FIFO (about 10% of tracked blocks). A block leaving the small queue
moves to the main FIFO if it was hit while there, otherwise it is evicted and remembered in a
ghost queue of keys; a ghost that comes back is inserted straight into the main queue. The main
queue gives each block with hits another round (frequency decremented, capped at 3). One-time
scans therefore pass through the small queue without flushing the reused working set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvtier.policy.base import EvictionPolicy, K

_MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy[K]):
    name = "s3fifo"

    def __init__(self, small_fraction: float = 0.1) -> None:
        self._small_fraction = small_fraction
        self._small: OrderedDict[K, None] = OrderedDict()  # oldest first
        self._main: OrderedDict[K, None] = OrderedDict()
        self._ghost: OrderedDict[K, None] = OrderedDict()
        self._freq: dict[K, int] = {}

    def insert(self, key: K) -> None:
        if key in self._freq:
            self.access(key)
            return
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def access(self, key: K) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, _MAX_FREQ)

    def remove(self, key: K) -> None:
        if self._freq.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def pop_victim(self, evictable: Callable[[K], bool]) -> K | None:
        # Each tracked key is looked at most a few times (moves are bounded by frequency).
        budget = 2 * (_MAX_FREQ + 1) * len(self._freq) + 1
        skipped_small: list[K] = []
        skipped_main: list[K] = []
        try:
            while budget > 0 and (self._small or self._main):
                budget -= 1
                small_target = max(1, int(len(self._freq) * self._small_fraction))
                if self._small and (len(self._small) >= small_target or not self._main):
                    key, _ = self._small.popitem(last=False)
                    if not evictable(key):
                        skipped_small.append(key)
                    elif self._freq[key] > 0:
                        self._freq[key] = 0
                        self._main[key] = None
                    else:
                        self._evict(key, remember=True)
                        return key
                elif self._main:
                    key, _ = self._main.popitem(last=False)
                    if not evictable(key):
                        skipped_main.append(key)
                    elif self._freq[key] > 0:
                        self._freq[key] -= 1
                        self._main[key] = None
                    else:
                        self._evict(key, remember=False)
                        return key
                else:
                    break
            return None
        finally:
            # Skipped (pinned) keys keep their place at the head of their queue.
            for key in reversed(skipped_small):
                self._small[key] = None
                self._small.move_to_end(key, last=False)
            for key in reversed(skipped_main):
                self._main[key] = None
                self._main.move_to_end(key, last=False)

    def _evict(self, key: K, remember: bool) -> None:
        del self._freq[key]
        if remember:
            self._ghost[key] = None
            while len(self._ghost) > max(len(self._main), 1):
                self._ghost.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)
