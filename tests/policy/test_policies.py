"""Eviction policies: order, pins, and S3-FIFO's queues."""

from __future__ import annotations

import pytest

from kvtier.errors import ConfigError
from kvtier.policy import LRUPolicy, S3FIFOPolicy, make_policy


def always(_: object) -> bool:
    return True


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_common_behaviour(name: str) -> None:
    policy = make_policy(name)
    for k in range(10):
        policy.insert(k)
    assert len(policy) == 10 and 3 in policy
    policy.remove(3)
    assert 3 not in policy and len(policy) == 9
    victims = [policy.pop_victim(always) for _ in range(9)]
    assert sorted(victims) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert policy.pop_victim(always) is None and len(policy) == 0


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_non_evictable_keys_are_skipped_and_kept(name: str) -> None:
    policy = make_policy(name)
    for k in range(5):
        policy.insert(k)
    pinned = {0, 1, 2}
    assert policy.pop_victim(lambda k: k not in pinned) in {3, 4}
    assert policy.pop_victim(lambda k: k not in pinned) in {3, 4}
    assert policy.pop_victim(lambda k: k not in pinned) is None
    assert len(policy) == 3
    assert policy.pop_victim(always) == 0  # pinned keys kept their place


def test_lru_order() -> None:
    policy = LRUPolicy()
    for k in range(4):
        policy.insert(k)
    policy.access(0)
    assert [policy.pop_victim(always) for _ in range(4)] == [1, 2, 3, 0]


def test_s3fifo_ghost_readmits_to_main() -> None:
    policy = S3FIFOPolicy()
    for k in range(20):
        policy.insert(k)
    assert policy.pop_victim(always) == 0  # one-hit wonder leaves from the small queue into the ghost
    policy.insert(0)  # seen again: goes straight to the main queue
    for k in range(20, 40):
        policy.insert(k)
    order = [policy.pop_victim(always) for _ in range(len(policy))]
    assert order.index(0) > order.index(25)


def test_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="lru, s3fifo"):
        make_policy("arc")
