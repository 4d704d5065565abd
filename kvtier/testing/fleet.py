"""A small fleet on one machine, started the way an operator starts one: a ``kvtier index serve``,
one kvtier daemon per "node" publishing to it, one ``vllm serve`` replica per node attached to
its node's daemon, and ``kvtier route`` in front. For the routing tests and ``benchmarks/routing.py``.

Every part is a real process. Each replica's CPU worker is pinned to a core of its own where the
machine has enough (``VLLM_CPU_OMP_THREADS_BIND``), as vLLM's CPU backend does by default.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kvtier.testing.daemon import LocalDaemon, free_port, wait_until
from kvtier.testing.server import OpenAIServer
from kvtier.testing.workload import kvtier_connector_config


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    if not wait_until(answers, timeout=timeout_s, interval=0.1):
        raise RuntimeError(f"{url} did not answer in {timeout_s}s:\n{log.read_text(errors='replace')[-3000:]}")


@dataclass
class LocalIndex:
    """``kvtier index serve`` with a token, on free ports (gRPC and the fast path)."""

    root: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    address: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    fast_address: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    ttl_s: float = 5.0
    engine_events: Sequence[str] = ()  # "node=tcp://host:port": engines' own KV events (their GPU tier)
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "index.log"

    def start(self) -> LocalIndex:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kvtier", "index", "serve", "--address", self.address, "--fast-address", self.fast_address,
                 "--ttl", str(self.ttl_s), *(f"--engine-events={e}" for e in self.engine_events)], env={**os.environ, "KVTIER_INDEX_AUTH_TOKEN": self.token}, stdout=log,
                stderr=subprocess.STDOUT)
        from kvtier.index.client import IndexClient

        with IndexClient(self.address, token=self.token, timeout_s=1) as client:
            def answers() -> bool:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the index exited:\n{self.log_path.read_text()}")
                try:
                    client.nodes()
                    return True
                except Exception:  # noqa: BLE001 - not up yet
                    return False

            if not wait_until(answers, timeout=30):
                raise RuntimeError(f"the index did not start:\n{self.log_path.read_text()}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)


@dataclass
class Router:
    """``kvtier route`` in a subprocess."""

    root: Path
    replicas: Sequence[str]  # NODE=URL
    index: LocalIndex | None
    policy: str = "prefix"
    args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / f"router-{self.policy}-{self.port}.log"

    def start(self) -> Router:
        command = [sys.executable, "-m", "kvtier", "route", "--address", f"127.0.0.1:{self.port}", "--policy", self.policy,
                   "--log-decisions", *self.args]
        for replica in self.replicas:
            command += ["--replica", replica]
        env = {**os.environ, **self.env}
        if self.index is not None:
            command += ["--index", self.index.address, "--index-fast-address", self.index.fast_address]
            env["KVTIER_INDEX_AUTH_TOKEN"] = self.index.token
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        _wait_http(f"{self.url}/health", self.process, self.log_path)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include ``labels``."""
        from prometheus_client.parser import text_string_to_metric_families

        return sum(sample.value for family in text_string_to_metric_families(self.metrics()) for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))

    def __enter__(self) -> Router:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Node:
    name: str
    daemon: LocalDaemon
    server: OpenAIServer

    @property
    def replica(self) -> str:
        return f"{self.name}={self.server.base_url}"


@contextlib.contextmanager
def local_fleet(root: Path, model: Path, nodes: Sequence[str], server_args: Sequence[str], *, host_capacity: str = "1GiB",
                disk_capacity: str = "2GiB", connector_extra: dict | None = None) -> Iterator[tuple[LocalIndex, list[Node]]]:
    """The index, then per node a daemon publishing to it and a ``vllm serve`` attached to that
    daemon, publishing its own KV events (its GPU tier) to the index as well; stopped in reverse
    order."""
    events_ports = {name: free_port() for name in nodes}
    index = LocalIndex(root / "index", engine_events=[f"{n}=tcp://127.0.0.1:{p}" for n, p in events_ports.items()]).start()
    started: list[Node] = []
    daemons: list[LocalDaemon] = []
    try:
        env = {"KVTIER_PUBLISH_AUTH_TOKEN": index.token}
        for name in nodes:
            daemon = LocalDaemon(root / f"d-{name}", args=["--index", index.address, "--node-name", name], env=env,
                                 host_capacity=host_capacity, disk_capacity=disk_capacity)
            daemon.start()
            daemons.append(daemon)
        servers = []
        cores = os.cpu_count() or 1
        for position, (name, daemon) in enumerate(zip(nodes, daemons)):
            server_env: dict[str, str | None] = {"VLLM_ENABLE_V1_MULTIPROCESSING": None, "OMP_NUM_THREADS": None}
            server_env["VLLM_CPU_OMP_THREADS_BIND"] = str(position % cores) if cores > 1 else None
            events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_ports[name]}",
                      "topic": f"kv@{name}@{model}"}
            servers.append(OpenAIServer(model, log_path=root / f"vllm-{name}.log", env=server_env,
                                        args=[*server_args, "--kv-events-config", json.dumps(events)],
                                        kv_transfer_config=kvtier_connector_config(daemon.socket_path, **(connector_extra or {}))))
        for name, daemon, server in zip(nodes, daemons, servers):
            server.wait_ready()
            started.append(Node(name, daemon, server))
        yield index, started
    finally:
        for node in started:
            node.server.stop()
        for daemon in daemons:
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.stop()
        index.stop()


def wait_for_node_blocks(index: LocalIndex, node: str, minimum: int, timeout_s: float = 60) -> bool:
    """Wait until the index counts ``minimum`` blocks of ``node`` (its daemon published its saves)."""
    from kvtier.index.client import IndexClient

    with IndexClient(index.address, token=index.token, timeout_s=2) as client:
        def enough() -> bool:
            for status in client.nodes():
                if status.info.node == node:
                    return sum(status.indexed_blocks.values()) >= minimum
            return False

        return wait_until(enough, timeout=timeout_s, interval=0.1)
