"""Two daemons as separate processes on loopback, sharing a real Redis index (docs/peer.md)."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from kvtier.blocks import hash_prompt
from kvtier.blocks.layout import KVLayout
from kvtier.client import DaemonClient
from kvtier.testing.daemon import LocalDaemon, free_port, wait_until
from kvtier.testing.peers import PEER_TOKEN, peer_env

TOKEN = PEER_TOKEN
# 256 KiB blocks: 4 layers x 2 (K, V) x 8 heads x 128 x 16 tokens x 2 bytes
LAYOUT = KVLayout(model="test/peer", dtype="float16", num_layers=4, num_kv_heads=8, head_size=128, block_size=16)


def prompt_hashes(blocks: int, seed: int = 0) -> list[bytes]:
    return hash_prompt([(seed * 7919 + i * 31) % 50_000 for i in range(blocks * LAYOUT.block_size)], LAYOUT.block_size)


def payloads(hashes: list[bytes]) -> dict[bytes, bytes]:
    """Distinct bytes per block, derived from its hash."""
    return {h: (h * (LAYOUT.block_nbytes // len(h) + 1))[: LAYOUT.block_nbytes] for h in hashes}


class PeerPair:
    """Daemon A (the holder) and daemon B (the puller), each with a client."""

    def __init__(self, a: LocalDaemon, b: LocalDaemon, redis_url: str, namespace: str) -> None:
        self.a, self.b = a, b
        self.redis_url, self.namespace = redis_url, namespace
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
                  env_b: dict | None = None, host_capacity: str = "64MiB", port_a: int | None = None,
                  token: str = TOKEN) -> PeerPair:
            namespace = f"peer-{uuid.uuid4().hex[:8]}"
            def daemon(name: str, transport: str, env: dict | None, port: int | None) -> LocalDaemon:
                for attempt in range(3):  # a port found free may be taken before the daemon binds it
                    started = LocalDaemon(tmp_path / name, env=peer_env(f"node-{name}", redis_url, namespace, port=port or free_port(),
                                                                       transport=transport, token=token, **(env or {})),
                                          host_capacity=host_capacity)
                    try:
                        started.start()
                    except RuntimeError as exc:
                        if attempt == 2 or not any(m in str(exc) for m in ("in use", "Failed to bind", "cannot listen")):
                            raise
                        continue
                    stack.callback(lambda d=started: d.stop() if d.process and d.process.poll() is None else None)
                    return started
                raise AssertionError("unreachable")

            a = daemon("a", transport_a, env_a, port_a)
            b = daemon("b", transport_b, env_b, None)
            pair = PeerPair(a, b, redis_url, namespace)
            stack.callback(pair.close)
            return pair

        yield start


class KillingForwarder:
    """A TCP forwarder in front of one of a daemon's ports that SIGKILLs the daemon once
    ``kill_after`` bytes have gone from it to the client: a holder dying while serving a fetch.

    In front of the block stream (the TCP path) the kill lands mid-stream; in front of the peer
    service (NIXL), a threshold past the offer kills the holder before or during the READ.
    """

    def __init__(self, upstream_port: int, kill_after: int, kill_delay_s: float = 0.0, listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.upstream_port = upstream_port
        self.daemon: LocalDaemon | None = None  # set once started
        self.kill_after = kill_after
        self.kill_delay_s = kill_delay_s
        self.forwarded = 0
        self.killed = threading.Event()
        self._listener = socket.create_server(listen)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:  # the daemon is dead: so is this connection
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_daemon: bool) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if from_daemon:
                    with self._lock:
                        self.forwarded += len(data)
                        crossed = self.forwarded >= self.kill_after and not self.killed.is_set()
                        if crossed:
                            self.killed.set()
                    if crossed:
                        threading.Timer(self.kill_delay_s, self.daemon.process.kill).start()
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()
