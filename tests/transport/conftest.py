"""Two daemons as separate processes on loopback, sharing a real Redis index (docs/peer.md)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from kvtier.blocks import hash_prompt
from kvtier.blocks.layout import KVLayout
from kvtier.client import DaemonClient
from kvtier.testing.daemon import LocalDaemon, free_port, wait_until

TOKEN = "peer-test-token-0123456789"
# 256 KiB blocks: 4 layers x 2 (K, V) x 8 heads x 128 x 16 tokens x 2 bytes
LAYOUT = KVLayout(model="test/peer", dtype="float16", num_layers=4, num_kv_heads=8, head_size=128, block_size=16)


def peer_env(node: str, redis_url: str, namespace: str, *, port: int | None = None, transport: str = "auto",
             token: str = TOKEN, **extra: str) -> dict[str, str]:
    env = {
        "KVTIER_DAEMON_NODE": node,
        "KVTIER_DAEMON_AUTH_TOKEN": token,
        "KVTIER_PUBLISH_INDEX": redis_url,
        "KVTIER_PUBLISH_NAMESPACE": namespace,
        "KVTIER_PUBLISH_INTERVAL_S": "0.05",
        "KVTIER_PUBLISH_HEARTBEAT_S": "0.5",
        "KVTIER_PEER_TRANSPORT": transport,
        **extra,
    }
    if port is not None:
        env["KVTIER_DAEMON_TCP_ADDRESS"] = f"127.0.0.1:{port}"
    return env


def prompt_hashes(blocks: int, seed: int = 0) -> list[bytes]:
    return hash_prompt([(seed * 7919 + i * 31) % 50_000 for i in range(blocks * LAYOUT.block_size)], LAYOUT.block_size)


def payloads(hashes: list[bytes]) -> dict[bytes, bytes]:
    """Distinct bytes per block, derived from its hash."""
    return {h: (h * (LAYOUT.block_nbytes // len(h) + 1))[: LAYOUT.block_nbytes] for h in hashes}


class PeerPair:
    """Daemon A (the holder) and daemon B (the puller), each with a client."""

    def __init__(self, a: LocalDaemon, b: LocalDaemon) -> None:
        self.a, self.b = a, b
        self.client_a = DaemonClient(a.socket_path, timeout_s=10)
        self.client_b = DaemonClient(b.socket_path, timeout_s=10)
        self.client_a.register_layout(LAYOUT)
        self.client_b.register_layout(LAYOUT)

    def fill_a(self, hashes: list[bytes]) -> dict[bytes, bytes]:
        data = payloads(hashes)
        self.client_a.write_blocks(LAYOUT.layout_id, data)
        return data

    def wait_b_sees_peer(self, hashes: list[bytes], timeout: float = 20) -> bool:
        """Wait until B's lookup finds the blocks on a peer (A published them, B's replica read them)."""
        return wait_until(lambda: self.client_b.lookup(LAYOUT.layout_id, hashes) == ["peer"] * len(hashes), timeout=timeout)

    def peer_stats(self, client: DaemonClient) -> dict[str, int]:
        tier = next((t for t in client.stats().chain.tiers if t.name == "peer"), None)
        return {} if tier is None else {f: getattr(tier.counters, f) for f in ("hits", "misses", "corrupt", "errors", "bytes_in")}

    def close(self) -> None:
        self.client_a.close()
        self.client_b.close()


@pytest.fixture
def peer_pair(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., PeerPair]]:
    """Start A and B (arguments: transport for each, extra env for each); stopped at the end."""
    with ExitStack() as stack:

        def start(transport_a: str = "auto", transport_b: str = "auto", env_a: dict | None = None,
                  env_b: dict | None = None, host_capacity: str = "64MiB") -> PeerPair:
            namespace = f"peer-{uuid.uuid4().hex[:8]}"
            a = LocalDaemon(tmp_path / "a", env=peer_env("node-a", redis_url, namespace, port=free_port(), transport=transport_a,
                                                         **(env_a or {})), host_capacity=host_capacity)
            b = LocalDaemon(tmp_path / "b", env=peer_env("node-b", redis_url, namespace, port=free_port(), transport=transport_b,
                                                         **(env_b or {})), host_capacity=host_capacity)
            for daemon in (a, b):
                daemon.start()
                stack.callback(lambda d=daemon: d.stop() if d.process and d.process.poll() is None else None)
            pair = PeerPair(a, b)
            stack.callback(pair.close)
            return pair

        yield start
