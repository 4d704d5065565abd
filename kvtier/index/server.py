"""``kvtier index serve``: the index service on a TCP listener, with health and a TTL sweeper.

Every TCP call authenticates: a bearer token or mutual TLS is required, as for the daemon. An
in-memory index purges nodes past their heartbeat TTL every quarter TTL (a Redis replica runs its
own sweeper). vLLM engines' KV-event streams listed in ``index.engine_events`` feed the GPU tier.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvtier.config import KVTierConfig
from kvtier.daemon.auth import BearerTokenInterceptor, listen, resolve_token, server_credentials
from kvtier.errors import ConfigError
from kvtier.index.base import KVIndex
from kvtier.index.factory import make_index
from kvtier.index.fast_server import IndexFastServer, server_tls_context
from kvtier.index.memory import MemoryIndex
from kvtier.index.service import SERVICE_NAME, add_index_service
from kvtier.stop_signals import stop_on_signals, wait_for_stop

log = logging.getLogger(__name__)

MAX_FAST_MESSAGE_BYTES = 80 << 20  # a 1M-block prompt's token ids (64 MiB packed), with room to spare


class IndexSweeper:
    """Purges an in-memory index's expired nodes in the background."""

    def __init__(self, index: MemoryIndex) -> None:
        self._index = index
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-index-sweeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(max(self._index.heartbeat_ttl_s / 4, 0.05)):
            try:
                dead = self._index.expire()
                if dead:
                    log.info("index: nodes %s sent no heartbeat for %.0fs; their blocks are forgotten", dead,
                             self._index.heartbeat_ttl_s)
            except Exception:  # the sweeper outlives any one failure
                log.exception("index: purging expired nodes failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class IndexServer:
    def __init__(self, config: KVTierConfig, index: KVIndex | None = None) -> None:
        self.config = config
        self.index = index
        self.port: int | None = None
        self._server: grpc.Server | None = None
        self._sweeper: IndexSweeper | None = None
        self._subscribers: list = []
        self._fast: IndexFastServer | None = None
        self.fast_port: int | None = None

    def start(self) -> None:
        settings = self.config.index
        token = resolve_token(settings, "index")
        tls = server_credentials(settings, "index")
        if token is None and (tls is None or settings.tls_client_ca_file is None):
            raise ConfigError("the index listens on TCP, so its calls must authenticate: set KVTIER_INDEX_AUTH_TOKEN "
                              "(or index.auth_token_file), or mutual TLS (tls_cert_file, tls_key_file, tls_client_ca_file)")
        if self.index is None:
            self.index = make_index(settings)
        interceptors = (BearerTokenInterceptor(token),) if token else ()
        server = grpc.server(ThreadPoolExecutor(settings.workers, thread_name_prefix="kvtier-index"), interceptors=interceptors)
        add_index_service(self.index, server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = listen(server, settings.address, tls, "index.address")
        server.start()
        self._server = server
        if settings.fast_address:
            fast = IndexFastServer(self.index, token=token, tls=server_tls_context(settings),
                                   max_message_bytes=MAX_FAST_MESSAGE_BYTES, max_connections=settings.max_fast_connections)
            try:
                self.fast_port = fast.listen(settings.fast_address)
            except ConfigError:
                self.stop(0)
                raise
            self._fast = fast
        if isinstance(self.index, MemoryIndex):
            self._sweeper = IndexSweeper(self.index)
        self._start_engine_subscribers()
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("kvtier index serving on %s, fast path on %s (store %s)", settings.address, settings.fast_address or "(off)",
                 settings.store.split("@")[-1])

    def _start_engine_subscribers(self) -> None:
        if not self.config.index.engine_events:
            return
        from kvtier.events.vllm_in import subscribe_engines

        self._subscribers = subscribe_engines(self.index, self.config.index.engine_events)

    def stop(self, grace_s: float = 2.0) -> None:
        for subscriber in self._subscribers:
            subscriber.close()
        self._subscribers.clear()
        if self._fast is not None:
            self._fast.stop(grace_s)
            self._fast = None
        if self._server is not None:
            self._health.enter_graceful_shutdown()
            self._server.stop(grace_s).wait()
            self._server = None
        if self._sweeper is not None:
            self._sweeper.close()
            self._sweeper = None
        if self.index is not None:
            self.index.close()


def run_index(config: KVTierConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = IndexServer(config)
    with stop_on_signals() as stop:
        try:
            server.start()
            fast = f"; fast path on {config.index.fast_address} (port {server.fast_port})" if server.fast_port else ""
            print(f"kvtier index ready on {config.index.address} (port {server.port}){fast}", flush=True)
            wait_for_stop(stop)
        finally:
            server.stop()
