"""Score latency and event ingest of the global index, in memory and with Redis as the store.

    python -m benchmarks.index [--quick] [--blocks 10000000] [--nodes 64] [--no-redis]

The index is filled with ``--blocks`` distinct block keys (10 million; 1 million with
``--quick``) spread over ``--nodes`` nodes and three tiers, each key held by one to three nodes,
published as batches of 1,000 keys the way daemons send them. Then prompts of 128, 512 and
2,048 blocks, each cached by 16 of the nodes as prefixes of different lengths split over GPU,
host and disk, are scored:

- ``score from hashes``: ``score_hashes`` on the prompt's 16-byte kvtier hashes (what a router
  that hashes itself sends); ``score from token ids``: ``score_tokens``, kvtier's hashing included.
  Targets for 2,048 blocks: p50 <= 1 ms and p99 <= 3 ms from hashes, p50 <= 2 ms from token ids.
  ``baseline`` is the target (``ratio`` <= 1 meets it); each row also records ``bare_walk_ms``,
  a bare dict lookup per block over the same keys in the same run, the floor of any Python walk.
- ``router Score``: the same queries as a router makes them, from another process through the
  typed client over loopback, serialisation and the network stack included: against the filled
  index served by ``kvtier index serve``'s server in a process of its own (forked), and against a
  separate ``kvtier index serve --store redis://...`` replica. Over the fast path (the targets
  above apply to it) and over gRPC (informative: a Python gRPC call costs ~0.7 ms on each side).
- ``ingest``: block events per second into the index (target >= 200,000 per replica): applying
  batches in memory; with Redis, publishing through the store (one Lua call per batch) and the
  replica's view applying the store's log.
- ``memory per indexed block``: the process's resident memory growth per distinct key and per
  (node, tier, key) holding (informative).
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.common import Row, command_line, make_parser, print_table, summarize_targets, write_results
from kvtier.blocks.hashing import hash_prompt
from kvtier.events.model import BlockEvent, IndexTier, NodeInfo, Op, PublishBatch, ServedLayout, Space, index_keys
from kvtier.index.base import KVIndex
from kvtier.index.memory import MemoryIndex

SPACE = Space("bench/llama", 16)
BATCH_KEYS = 1000
PROMPT_BLOCKS = (128, 512, 2048)
CACHING_NODES = 16
TARGETS_MS = {("hashes", "p50"): 1.0, ("hashes", "p99"): 3.0, ("tokens", "p50"): 2.0}
INGEST_TARGET = 200_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class Publishers:
    """One session per node, batches in order."""

    def __init__(self, index: KVIndex, nodes: int) -> None:
        self.index = index
        self.names = [f"node-{i:03d}" for i in range(nodes)]
        self.seq = dict.fromkeys(self.names, 0)
        self.sessions = {name: uuid.uuid4().hex for name in self.names}
        for name in self.names:
            self.send(name, [], reset=True)
            self.beat(name)

    def send(self, name: str, events: list[BlockEvent], reset: bool = False) -> None:
        self.seq[name] += 1
        self.index.publish(PublishBatch(name, self.sessions[name], self.seq[name], reset, events))

    def beat(self, name: str) -> None:
        layout = ServedLayout("0123456789abcdef", SPACE.model, SPACE.block_size)
        self.index.heartbeat(NodeInfo(name, self.sessions[name], self.seq[name], layouts=[layout]))

    def beat_all(self) -> None:
        for name in self.names:
            self.beat(name)


def fill(publishers: Publishers, blocks: int, rng: random.Random) -> tuple[int, float]:
    """Publish ``blocks`` random keys, each to 1-3 nodes and a random tier; return (holdings, seconds)."""
    tiers = (IndexTier.GPU, IndexTier.HOST, IndexTier.DISK)
    names = publishers.names
    holdings = 0
    started = time.perf_counter()
    for start in range(0, blocks, BATCH_KEYS):
        keys = [rng.getrandbits(64) for _ in range(min(BATCH_KEYS, blocks - start))]
        for name in rng.sample(names, rng.randint(1, 3)):
            publishers.send(name, [BlockEvent(Op.STORED, rng.choice(tiers), SPACE, "0123456789abcdef", keys)])
            holdings += len(keys)
        if start % (200 * BATCH_KEYS) == 0:
            publishers.beat_all()
    return holdings, time.perf_counter() - started


def cache_prompts(publishers: Publishers, rng: random.Random) -> dict[int, list[int]]:
    """Prompts of each length, each cached by CACHING_NODES nodes as prefixes split over tiers."""
    prompts = {}
    for length in PROMPT_BLOCKS:
        tokens = [rng.randrange(128_000) for _ in range(length * SPACE.block_size)]
        keys = index_keys(hash_prompt(tokens, SPACE.block_size))
        for name in rng.sample(publishers.names, CACHING_NODES):
            held = rng.randint(length // 4, length)
            gpu, host = sorted(rng.randint(0, held) for _ in range(2))
            events = [BlockEvent(Op.STORED, tier, SPACE, "0123456789abcdef", keys[a:b])
                      for tier, a, b in ((IndexTier.GPU, 0, gpu), (IndexTier.HOST, gpu, host), (IndexTier.DISK, host, held)) if b > a]
            publishers.send(name, events)
        prompts[length] = tokens
    publishers.beat_all()
    return prompts


def percentiles(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(p50, p99) of ``fn`` in ms over ``runs`` calls (after a few warm-up calls)."""
    for _ in range(5):
        fn()
    samples = []
    gc.disable()
    try:
        for _ in range(runs):
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) * 1e3)
    finally:
        gc.enable()
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def bare_walk_ms(keys: list[int], runs: int) -> float:
    table = {key: 1 for key in keys}
    get = table.get

    def walk() -> None:
        for key in keys:
            if get(key) is None:
                break

    return percentiles(walk, runs)[0]


def score_rows(index: KVIndex, prompts: dict[int, list[int]], store: str, runs: int) -> list[Row]:
    rows = []
    for length, tokens in prompts.items():
        hashes = hash_prompt(tokens, SPACE.block_size)
        scores = index.score_hashes(SPACE, hashes)
        assert len(scores) >= CACHING_NODES // 2, f"{store}: only {len(scores)} nodes scored"
        floor = bare_walk_ms(index_keys(hashes), runs)
        for source, fn in (("hashes", lambda h=hashes: index.score_hashes(SPACE, h)),
                           ("tokens", lambda t=tokens: index.score_tokens(SPACE.model, t, block_size=SPACE.block_size))):
            p50, p99 = percentiles(fn, runs)
            for stat, value in (("p50", p50), ("p99", p99)):
                target = TARGETS_MS.get((source, stat)) if length == 2048 else None
                rows.append(Row(
                    f"score from {source}, {length} blocks, {store} | {stat}", f"score_{stat}_ms", value,
                    target if target is not None else value, unit="ms", better="lower",
                    target=1.0 if target is not None else None,
                    bound=f"target {target} ms" if target is not None else "informative",
                    extra={"prompt_blocks": length, "store": store, "bare_walk_ms": round(floor, 4),
                           "nodes_scored": len(scores)},
                ))
    return rows


ROUTER_TOKEN = "bench-token-0123456789"


@contextlib.contextmanager
def forked_index_server(index: KVIndex) -> Iterator[tuple[str, str]]:
    """``kvtier index serve``'s server over ``index`` in a child process of its own (forked, so
    the filled index comes along), as a router meets it; yields its (gRPC, fast-path) addresses.
    The parent must not have made a gRPC channel or server before this (gRPC and fork)."""
    from kvtier.config import KVTierConfig
    from kvtier.index.server import IndexServer

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the index's process: serve until SIGTERM
        try:
            os.close(read_end)
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
            config = KVTierConfig.model_validate({"index": {"address": "127.0.0.1:0", "fast_address": "127.0.0.1:0",
                                                            "auth_token": ROUTER_TOKEN}})
            server = IndexServer(config, index)
            server.start()
            os.write(write_end, f"{server.port} {server.fast_port}".encode())
            signal.sigwait([signal.SIGTERM])
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ports = os.read(read_end, 64).split()
        assert len(ports) == 2, "the index process did not start"
        yield f"127.0.0.1:{int(ports[0])}", f"127.0.0.1:{int(ports[1])}"
    finally:
        os.close(read_end)
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


@contextlib.contextmanager
def index_serve_process(redis_url: str, namespace: str) -> Iterator[tuple[str, str]]:
    """``kvtier index serve --store <redis>`` as a separate process (a replica of its own, built
    from Redis); yields its (gRPC, fast-path) addresses."""
    from kvtier.testing.daemon import free_port

    addresses = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    process = subprocess.Popen([sys.executable, "-m", "kvtier", "index", "serve", "--address", addresses[0], "--fast-address",
                                addresses[1], "--store", redis_url, "--namespace", namespace, "--ttl", "3600"],
                               env={**os.environ, "KVTIER_INDEX_AUTH_TOKEN": ROUTER_TOKEN}, stdout=subprocess.DEVNULL)
    try:
        yield addresses
    finally:
        process.terminate()
        process.wait(60)


def router_rows(addresses: tuple[str, str], index: KVIndex, prompts: dict[int, list[int]], store: str, runs: int,
                ready_timeout_s: float = 5.0) -> list[Row]:
    """Score as a router calls it: from another process, over the fast path and over gRPC.
    The fast path carries the targets (what a router that scores every request uses); gRPC is
    informative. Answers are checked equal to ``index``'s own first."""
    from kvtier.index.client import IndexClient

    grpc_address, fast_address = addresses
    rows = []
    with IndexClient(grpc_address, token=ROUTER_TOKEN) as over_grpc, \
            IndexClient(grpc_address, token=ROUTER_TOKEN, fast_address=fast_address) as over_fast_path:
        expected = {length: index.score_hashes(SPACE, hash_prompt(tokens, SPACE.block_size)) for length, tokens in prompts.items()}
        deadline = time.monotonic() + ready_timeout_s
        while not _answers(over_fast_path, prompts, expected):
            assert time.monotonic() < deadline, f"{store}: the index process did not give the in-process answers"
            time.sleep(0.5)
        for length in (PROMPT_BLOCKS[0], PROMPT_BLOCKS[-1]):
            tokens = prompts[length]
            hashes = hash_prompt(tokens, SPACE.block_size)
            for transport, client in (("fast path", over_fast_path), ("gRPC", over_grpc)):
                assert client.score(SPACE.model, token_ids=tokens, block_size=SPACE.block_size) == expected[length]
                for source, fn in (("hashes", lambda c=client, h=hashes: c.score(SPACE.model, block_hashes=h, block_size=SPACE.block_size)),
                                   ("tokens", lambda c=client, t=tokens: c.score(SPACE.model, token_ids=t, block_size=SPACE.block_size))):
                    p50, p99 = percentiles(fn, runs)
                    for stat, value in (("p50", p50), ("p99", p99)):
                        target = TARGETS_MS.get((source, stat)) if length == 2048 and transport == "fast path" else None
                        rows.append(Row(
                            f"router Score over {transport} from {source}, {length} blocks, {store} | {stat}", f"score_{stat}_ms", value,
                            target if target is not None else value, unit="ms", better="lower",
                            target=1.0 if target is not None else None,
                            bound=f"target {target} ms" if target is not None else "informative",
                            extra={"prompt_blocks": length, "store": store, "transport": transport, "process": "separate"},
                        ))
    return rows


def _answers(client: object, prompts: dict[int, list[int]], expected: dict[int, list]) -> bool:
    try:
        return all(client.score(SPACE.model, token_ids=tokens, block_size=SPACE.block_size) == expected[length]  # type: ignore[attr-defined]
                   for length, tokens in prompts.items())
    except Exception:  # noqa: BLE001 - still starting or catching up
        return False


def ingest_memory(blocks: int, nodes: int, rng: random.Random) -> tuple[MemoryIndex, Publishers, list[Row]]:
    gc.collect()
    before = rss_bytes()
    index = MemoryIndex(heartbeat_ttl_s=3600)
    publishers = Publishers(index, nodes)
    holdings, seconds = fill(publishers, blocks, rng)
    gc.collect()
    grown = rss_bytes() - before
    rate = holdings / seconds
    rows = [
        Row("ingest, memory", "block_events_per_s", rate, INGEST_TARGET, unit="/s", target=1.0,
            bound=f"target {INGEST_TARGET:,} block events/s", extra={"holdings": holdings, "keys": index.indexed_keys()}),
        Row("memory per indexed block, memory", "bytes_per_key", grown / index.indexed_keys(), grown / holdings, unit="B",
            better="lower", bound="bytes per (node, tier, key) holding (baseline column)",
            extra={"rss_growth_bytes": grown, "keys": index.indexed_keys(), "holdings": holdings}),
    ]
    return index, publishers, rows


def redis_rows(blocks: int, nodes: int, prompts_seed: int, runs: int) -> list[Row]:
    from kvtier.index.redis import RedisIndex, RedisStore
    from tests.servers import redis_server

    rows = []
    with redis_server() as url:
        # The writers are daemons elsewhere: a bare store here, so the replica's view is the only
        # one in this process, as in a replica of its own.
        writer = RedisStore.from_url(url, namespace="bench")
        try:
            rng = random.Random(prompts_seed)
            publishers = Publishers(writer, nodes)
            holdings, seconds = fill(publishers, blocks, rng)
            rows.append(Row("ingest, Redis store (publish, one Lua call per batch)", "block_events_per_s", holdings / seconds,
                            INGEST_TARGET, unit="/s", target=1.0, bound=f"target {INGEST_TARGET:,} block events/s",
                            extra={"holdings": holdings}))
            prompts = cache_prompts(publishers, rng)
            started = time.perf_counter()
            replica = RedisIndex.from_url(url, namespace="bench", heartbeat_ttl_s=3600)
            try:
                assert replica.wait_synced(600), "the replica did not catch up"
                took = time.perf_counter() - started
                rows.append(Row("ingest, Redis replica catching up (snapshot + log)", "block_events_per_s", holdings / took,
                                INGEST_TARGET, unit="/s", target=1.0, bound=f"target {INGEST_TARGET:,} block events/s",
                                extra={"holdings": holdings, "seconds": round(took, 2)}))
                rows += score_rows(replica, prompts, "Redis replica", runs)
                with index_serve_process(url, "bench") as addresses:
                    rows += router_rows(addresses, replica, prompts, "Redis replica", runs, ready_timeout_s=600)
            finally:
                replica.close()
        finally:
            writer.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=None, help="distinct indexed block keys (default 10M, 1M with --quick)")
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis rows")
    args = parser.parse_args(argv)
    blocks = args.blocks or (1_000_000 if args.quick else 10_000_000)
    runs = 200 if args.quick else 1000
    print(f"# {command_line()}\n# {blocks:,} indexed blocks over {args.nodes} nodes, {runs} queries per case\n")
    rng = random.Random(1)
    index, publishers, rows = ingest_memory(blocks, args.nodes, rng)
    prompts = cache_prompts(publishers, rng)
    rows += score_rows(index, prompts, "memory", runs)
    with forked_index_server(index) as addresses:
        rows += router_rows(addresses, index, prompts, "memory", runs)
    del index, publishers
    gc.collect()
    if not args.no_redis:
        rows += redis_rows(blocks, args.nodes, 1, runs)
    print_table(rows)
    summarize_targets(rows)
    if not args.no_write:
        path = write_results("index", rows)
        print(f"wrote {Path(path).relative_to(Path.cwd()) if Path(path).is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
