"""Least-recently-used eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvtier.policy.base import EvictionPolicy, K


class LRUPolicy(EvictionPolicy[K]):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()  # oldest first

    def insert(self, key: K) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: K) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: K) -> None:
        self._order.pop(key, None)

    def pop_victim(self, evictable: Callable[[K], bool]) -> K | None:
        for key in self._order:
            if evictable(key):
                del self._order[key]
                return key
        return None

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)
