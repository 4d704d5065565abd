"""Eviction policies: which block a tier gives up next. Pure bookkeeping, no I/O, no locking.

A policy tracks the keys a tier holds. ``pop_victim`` removes and returns the next block to
evict among those ``evictable`` allows (pinned or not-yet-demoted blocks are skipped, and stay
tracked); it returns None when no tracked key is evictable. The caller holds the chain's lock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(ABC, Generic[K]):
    name: str

    @abstractmethod
    def insert(self, key: K) -> None:
        """Start tracking ``key`` (a block just stored). Inserting a tracked key counts as an access."""

    @abstractmethod
    def access(self, key: K) -> None:
        """Record a hit on a tracked key (untracked keys are ignored)."""

    @abstractmethod
    def remove(self, key: K) -> None:
        """Stop tracking ``key`` (deleted for another reason than eviction); no-op if untracked."""

    @abstractmethod
    def pop_victim(self, evictable: Callable[[K], bool]) -> K | None:
        """Remove and return the next key to evict that ``evictable`` accepts, or None."""

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...
