"""Index backends for the conformance suite: each fixture yields a factory of fresh indexes.

A factory takes ``heartbeat_ttl_s`` and returns ``(index, settle)``; ``settle()`` waits until
what was published is visible to queries (a no-op in memory; a Redis replica tails its log).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvtier.index.base import KVIndex
from kvtier.index.memory import MemoryIndex

IndexFactory = Callable[..., tuple[KVIndex, Callable[[], None]]]


@pytest.fixture(params=["memory"])
def index_factory(request: pytest.FixtureRequest) -> Iterator[IndexFactory]:
    made: list[KVIndex] = []

    def make(heartbeat_ttl_s: float = 30.0) -> tuple[KVIndex, Callable[[], None]]:
        index = MemoryIndex(heartbeat_ttl_s=heartbeat_ttl_s)
        made.append(index)
        return index, lambda: None

    yield make
    for index in made:
        index.close()
