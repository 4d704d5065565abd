"""Index backends for the conformance suite: each fixture yields a factory of fresh indexes.

A factory takes ``heartbeat_ttl_s`` and returns ``(index, settle)``; ``settle()`` waits until
what was published is visible to queries (a no-op in memory; a Redis replica tails its log).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from kvtier.index.base import KVIndex
from kvtier.index.memory import MemoryIndex

IndexFactory = Callable[..., tuple[KVIndex, Callable[[], None]]]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def index_factory(request: pytest.FixtureRequest) -> Iterator[IndexFactory]:
    made: list[KVIndex] = []
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    def make(heartbeat_ttl_s: float = 30.0) -> tuple[KVIndex, Callable[[], None]]:
        if redis_url is None:
            index: KVIndex = MemoryIndex(heartbeat_ttl_s=heartbeat_ttl_s)
            made.append(index)
            return index, lambda: None
        from kvtier.index.redis import RedisIndex

        replica = RedisIndex.from_url(redis_url, namespace=f"test-{uuid.uuid4().hex[:8]}", heartbeat_ttl_s=heartbeat_ttl_s)
        made.append(replica)
        return replica, lambda: _settled(replica)

    yield make
    for index in made:
        index.close()


def _settled(replica) -> None:
    assert replica.wait_synced(10), "the Redis replica's view did not catch up"
