"""The Redis backend under the conditions a fleet meets: replicas, concurrency, restarts, silence."""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from kvtier.errors import IndexUnavailableError
from kvtier.events.model import IndexTier, Space
from kvtier.index.base import ApplyStatus, TierRun
from kvtier.index.redis import RedisIndex
from kvtier.index.redis_store import RedisStore, log_key, owned_key
from kvtier.testing.daemon import free_port, wait_until
from tests.index.test_conformance import SPACE, Node, keys, removed, stored
from tests.servers import redis_server

pytestmark = pytest.mark.redis


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def replicas(redis_url: str, namespace: str) -> Iterator[list[RedisIndex]]:
    made = [RedisIndex.from_url(redis_url, namespace=namespace, heartbeat_ttl_s=30) for _ in range(2)]
    # Built before a test writes: a replica that builds later starts from a snapshot and never tails older entries.
    assert all(replica.wait_synced(10) for replica in made)
    yield made
    for replica in made:
        replica.close()


def prefix_of(index, prompt) -> list[TierRun]:
    scores = index.score_keys(SPACE, prompt)
    return [(s.node, s.blocks, s.runs) for s in scores]


def test_two_replicas_agree_and_a_late_one_catches_up(replicas: list[RedisIndex], redis_url: str, namespace: str) -> None:
    first, second = replicas
    prompt = keys(20)
    a, b = Node(first, "a"), Node(second, "b")  # each publishes through a different replica
    a.start(stored(IndexTier.HOST, prompt[:15]))
    b.start(stored(IndexTier.DISK, prompt[:8]))
    assert first.wait_synced(10) and second.wait_synced(10)
    assert prefix_of(first, prompt) == prefix_of(second, prompt) == [
        ("a", 15, [TierRun(IndexTier.HOST, 0, 15)]), ("b", 8, [TierRun(IndexTier.DISK, 0, 8)])]
    late = RedisIndex.from_url(redis_url, namespace=namespace, heartbeat_ttl_s=30)
    try:
        assert late.wait_synced(10)
        assert prefix_of(late, prompt) == prefix_of(first, prompt)
        assert {n.info.node for n in late.nodes()} == {"a", "b"}
    finally:
        late.close()


def test_many_concurrent_publishers_and_queries_end_where_a_simple_model_does(replicas: list[RedisIndex]) -> None:
    first, second = replicas
    prompt = keys(30)
    model: dict[str, set[int]] = {}
    errors: list[BaseException] = []

    def publisher(name: str, seed: int) -> None:
        rng = random.Random(seed)
        node = Node(first if seed % 2 else second, name)
        node.start()
        held: set[int] = set()
        try:
            for _ in range(150):
                start = rng.randrange(30)
                chunk = prompt[start:start + rng.randrange(1, 8)]
                if rng.random() < 0.6:
                    assert node.send(stored(IndexTier.HOST, chunk)) is ApplyStatus.OK
                    held.update(chunk)
                else:
                    assert node.send(removed(IndexTier.HOST, chunk)) is ApplyStatus.OK
                    held.difference_update(chunk)
            node.beat()
            model[name] = held
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    def querier() -> None:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for replica in replicas:
                replica.score_keys(SPACE, prompt)

    threads = [threading.Thread(target=publisher, args=(f"n{i}", i)) for i in range(8)] + [threading.Thread(target=querier)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    expected = {}
    for name, held in model.items():
        length = 0
        while length < 30 and prompt[length] in held:
            length += 1
        if length:
            expected[name] = length
    for replica in replicas:
        assert replica.wait_synced(20)
        assert {s.node: s.blocks for s in replica.score_keys(SPACE, prompt)} == expected


def test_a_redis_restart_is_recovered_by_resyncs(namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    prompt = keys(10)
    with redis_server(port=port) as url:
        replica = RedisIndex.from_url(url, namespace=namespace, heartbeat_ttl_s=30)
        writer = RedisStore.from_url(url, namespace=namespace)
        a = Node(writer, "a")
        a.start(stored(IndexTier.HOST, prompt))
        assert replica.wait_synced(10) and replica.score_keys(SPACE, prompt)[0].blocks == 10
    # Redis is down: a publisher gets a clear error; the replica keeps answering from its view
    with caplog.at_level(logging.WARNING), pytest.raises(IndexUnavailableError, match="Redis"):
        a.send(stored(IndexTier.HOST, prompt[:1]))
    assert replica.score_keys(SPACE, prompt)[0].blocks == 10
    with redis_server(port=port):  # back, and empty
        a.seq -= 1  # the failed batch was not sent
        assert wait_until(lambda: _resync_asked(a, prompt), timeout=15)
        a.start(stored(IndexTier.DISK, prompt[:4]))  # the publisher re-sends its full state
        assert wait_until(lambda: replica.wait_synced(1) and
                          [s.runs for s in replica.score_keys(SPACE, prompt)] == [[TierRun(IndexTier.DISK, 0, 4)]], timeout=20)
        assert replica.stats["rebuilds"] >= 2
    replica.close()
    writer.close()


def _resync_asked(node: Node, prompt: list[int]) -> bool:
    try:
        return node.send(stored(IndexTier.HOST, prompt[:1])) is ApplyStatus.RESYNC
    except IndexUnavailableError:
        node.seq -= 1
        return False


def test_a_silent_node_is_purged_from_redis(redis_url: str, namespace: str) -> None:
    replica = RedisIndex.from_url(redis_url, namespace=namespace, heartbeat_ttl_s=0.5)
    try:
        prompt = keys(4)
        Node(replica, "gone").start(stored(IndexTier.HOST, prompt))
        assert replica.wait_synced(10)
        client = replica.client
        assert client.smembers(owned_key(replica.prefix, "gone"))
        assert wait_until(lambda: not client.smembers(owned_key(replica.prefix, "gone")), timeout=10)
        assert replica.score_keys(SPACE, prompt) == [] and replica.stats["purged"] >= 1
    finally:
        replica.close()


def test_the_first_write_into_an_empty_namespace_is_not_taken_for_a_flush(replicas: list[RedisIndex]) -> None:
    first, _ = replicas
    first.client.xadd(log_key(first.prefix), {"k": "?", "d": b""})
    assert wait_until(lambda: first.stats["bad_entries"] == 1, 10)
    Node(first, "a").start(stored(IndexTier.HOST, keys(2)))
    assert first.wait_synced(10)
    assert first.stats["rebuilds"] == 1  # a rebuild here would skip log entries written in between


def test_malformed_log_entries_are_skipped(replicas: list[RedisIndex], caplog: pytest.LogCaptureFixture) -> None:
    first, _ = replicas
    prompt = keys(3)
    with caplog.at_level(logging.WARNING):
        first.client.xadd(log_key(first.prefix), {"k": "b", "d": b"\xc1garbage"})
        first.client.xadd(log_key(first.prefix), {"k": "?", "d": b""})
        Node(first, "a").start(stored(IndexTier.HOST, prompt))
        assert first.wait_synced(10)
    assert first.score_keys(SPACE, prompt)[0].blocks == 3
    assert first.stats["bad_entries"] == 2 and "malformed log entry" in caplog.text


def test_the_store_takes_credentials_from_a_file_and_keeps_them_out_of_errors(tmp_path, namespace: str) -> None:
    secret = "s3cret-redis-password"
    (tmp_path / "password").write_text(secret + "\n")
    with redis_server(password=secret) as url:
        store = RedisStore.from_url(url, password_file=tmp_path / "password", namespace=namespace)
        assert Node(store, "a").start() is None  # accepted
        store.close()
        anonymous = RedisStore.from_url(url, namespace=namespace)
        with pytest.raises(IndexUnavailableError) as failure:
            Node(anonymous, "a").start()
        assert secret not in str(failure.value)
        anonymous.close()


def test_a_replica_reads_and_writes_redis_over_tls(tmp_path, namespace: str) -> None:
    from tests.certs import ca_pem, issue, make_ca

    ca = make_ca("redis-test-ca")
    key, cert = issue(ca, "redis")
    files = {"redis.key": key, "redis.crt": cert, "ca.crt": ca_pem(ca)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with redis_server(tls=(tmp_path / "redis.crt", tmp_path / "redis.key", tmp_path / "ca.crt")) as url:
        assert url.startswith("rediss://")
        replica = RedisIndex.from_url(url, tls_ca_file=tmp_path / "ca.crt", namespace=namespace)
        try:
            prompt = keys(4)
            Node(replica, "a").start(stored(IndexTier.DISK, prompt))
            assert replica.wait_synced(10)
            assert replica.score_keys(SPACE, prompt)[0].runs == [TierRun(IndexTier.DISK, 0, 4)]
        finally:
            replica.close()
        # A certificate the client cannot verify (the system's CAs do not know this one), and
        # plaintext against the TLS port: refused with the typed error, not written.
        for untrusted in (RedisStore.from_url(url, namespace=namespace), RedisStore.from_url(url.replace("rediss://", "redis://"),
                                                                                             namespace=namespace)):
            with pytest.raises(IndexUnavailableError):
                Node(untrusted, "b").start(stored(IndexTier.HOST, prompt))
            untrusted.close()


def test_a_publisher_cut_off_catches_up_with_nothing_lost(redis_url: str, namespace: str) -> None:
    """The daemon's publisher against a Redis store that goes away and comes back (a restart)."""
    from kvtier.blocks.hashing import hash_prompt
    from kvtier.blocks.keys import BlockKey
    from kvtier.chain import TierChain
    from kvtier.config import ChainConfig, HostTierConfig, PublishConfig
    from kvtier.events.model import ServedLayout
    from kvtier.events.publisher import IndexPublisher
    from kvtier.tiers.host import HostTier

    port = free_port()
    layout = "0123456789abcdef"
    hashes = hash_prompt(list(range(16 * 12)), 16)
    chain = TierChain([HostTier(HostTierConfig(capacity=64 * 4096, slab_size=4096))], ChainConfig())
    try:
        with redis_server(port=port) as url:
            store = RedisStore.from_url(url, namespace=namespace)
            replica = RedisIndex.from_url(url, namespace=namespace, heartbeat_ttl_s=30)
            publisher = IndexPublisher(chain, store, PublishConfig(interval_s=0.02, heartbeat_s=0.1), node="a",
                                       layouts=lambda: [ServedLayout(layout, SPACE.model, SPACE.block_size)], target=url)
            for h in hashes[:6]:
                chain.put(BlockKey(layout, h), bytes(4096))
            assert publisher.flush()
        for h in hashes[6:]:  # stored while the store is down
            chain.put(BlockKey(layout, h), bytes(4096))
        assert wait_until(lambda: not publisher.status().publishing, timeout=10)
        with redis_server(port=port):
            assert wait_until(lambda: replica.wait_synced(1) and replica.score_hashes(SPACE, hashes)
                              and replica.score_hashes(SPACE, hashes)[0].blocks == 12, timeout=30)
            assert publisher.status().resyncs >= 2
            publisher.close()
            replica.close()
            store.close()
    finally:
        chain.close()


def test_names_that_would_break_redis_keys_are_refused(replicas: list[RedisIndex]) -> None:
    from kvtier.errors import InvalidRequestError

    first, _ = replicas
    node = Node(first, "a")
    node.start()
    with pytest.raises(InvalidRequestError, match="'|'"):
        node.send(stored(IndexTier.HOST, keys(1), "bad|source"))
    assert Space("m", 16)
