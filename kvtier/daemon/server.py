"""The node daemon process: the tier chain served over gRPC, with health, metrics and a reaper.

Lifecycle: :meth:`DaemonServer.start` opens the tiers (the disk catalogue is rebuilt from what
is on disk), maps the host arena, and starts listening on the Unix socket, on the fast-path socket
beside it (``<socket>.fast``, unless disabled) and on the TCP listener if configured. :meth:`DaemonServer.stop` (on SIGTERM or SIGINT) reports NOT_SERVING, stops
taking calls, lets in-flight calls finish within ``grace_period_s``, flushes the write-back queue
within ``flush_timeout_s``, closes the tiers and removes the socket and the arena file.

The arena file's name derives from the socket path, so a daemon restarted after a crash finds
the stale file of its predecessor and replaces it; arena files of other dead kvtier processes in
the same folder are removed too (``kvtier.tiers.arena``: a dead owner's lock is free). Nothing in
the arena survives a restart; the disk and S3 tiers do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvtier.chain.factory import build_chain
from kvtier.config import KVTierConfig
from kvtier.daemon.auth import BearerTokenInterceptor, listen, resolve_token, server_credentials
from kvtier.daemon.core import DaemonCore
from kvtier.daemon.detach import apply_cpu_affinity
from kvtier.daemon.fast_server import FastPathServer
from kvtier.daemon.metrics import serve_metrics, stop_metrics
from kvtier.daemon.servicer import DaemonServicer
from kvtier.errors import ConfigError
from kvtier.events.publisher import IndexPublisher, served_layouts
from kvtier.events.sinks import open_sink, s3_location_of
from kvtier.events.vllm_out import BlockDescriptions, VllmEventPublisher
from kvtier.index.memory import MemoryIndex
from kvtier.index.server import IndexSweeper
from kvtier.index.service import add_index_service
from kvtier.stop_signals import stop_on_signals, wait_for_stop
from kvtier.transport.fetcher import PeerFetcher
from kvtier.transport.service import PeerServicer, add_peer_service
from kvtier.transport.setup import advertised_address, build_peers
from kvtier.v1 import daemon_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "kvtier.v1.KVTierDaemon"
MAX_UNIX_PATH = 107


def socket_is_live(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def fast_socket_path_for(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".fast")


def pid_path_for(socket_path: Path) -> Path:
    """Where the daemon serving ``socket_path`` writes its pid (``kvtier stop`` reads it)."""
    return socket_path.with_name(socket_path.name + ".pid")


def arena_name_for(socket_path: Path) -> str:
    digest = hashlib.sha256(str(socket_path.resolve()).encode()).hexdigest()[:12]
    return f"kvtier-{digest}-arena"


class DaemonServer:
    def __init__(self, config: KVTierConfig) -> None:
        self.config = config
        self.socket_path = Path(config.daemon.socket_path)
        self.fast_socket_path = fast_socket_path_for(self.socket_path) if config.daemon.fast_path else None
        self._stopped = threading.Event()
        self._servers: list[grpc.Server] = []
        self._metrics_server: object | None = None
        self._reaper: threading.Thread | None = None
        self._fast_server: FastPathServer | None = None
        self.tcp_port: int | None = None
        self.core: DaemonCore | None = None
        self.publisher: IndexPublisher | None = None
        self.local_index: MemoryIndex | None = None  # the daemon's own index, when it publishes to no other
        self._sweeper: IndexSweeper | None = None
        self.vllm_events: VllmEventPublisher | None = None
        self.peer_fetcher: PeerFetcher | None = None
        self.peer_service: PeerServicer | None = None

    # ---- start -------------------------------------------------------------------------------

    def _prepare_socket_folder(self) -> None:
        paths = [self.socket_path] + ([self.fast_socket_path] if self.fast_socket_path else [])
        for path in paths:
            if len(str(path)) > MAX_UNIX_PATH:
                raise ConfigError(f"daemon.socket_path gives the socket {path}, {len(str(path))} characters; Unix sockets "
                                  f"allow {MAX_UNIX_PATH}{' (the fast path adds .fast)' if path != self.socket_path else ''}")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        for path in paths:
            if path.exists():
                if socket_is_live(path):
                    raise ConfigError(f"a kvtier daemon is already listening on {path}")
                path.unlink()  # left behind by a daemon that was killed

    def _host_settings(self):
        host = self.config.host
        return host.model_copy(update={"name": host.name or arena_name_for(self.socket_path)})

    def start(self) -> None:
        daemon_config = self.config.daemon
        token = resolve_token(daemon_config)
        tls = server_credentials(daemon_config)
        if daemon_config.tcp_address and token is None and (tls is None or daemon_config.tls_client_ca_file is None):
            raise ConfigError(
                "daemon.tcp_address is set but TCP calls would be unauthenticated: set KVTIER_DAEMON_AUTH_TOKEN "
                "(or daemon.auth_token_file), or mutual TLS (tls_cert_file, tls_key_file, tls_client_ca_file)"
            )
        self._prepare_socket_folder()
        chain = build_chain(self.config, host=self._host_settings())
        self.core = DaemonCore(chain, daemon_config)
        servicer = DaemonServicer(self.core, daemon_config.node, str(self.fast_socket_path or ""))
        try:
            sink, target, self.local_index = open_sink(self.config)
        except BaseException:
            chain.close(flush_timeout=0)
            raise
        self._health = health.HealthServicer()
        # Not ready until every part has started (grpc's health service says SERVING by default).
        self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        options = [
            ("grpc.max_receive_message_length", daemon_config.max_message_bytes),
            ("grpc.max_send_message_length", daemon_config.max_message_bytes),
        ]
        try:
            local = self._new_server(servicer, options, interceptors=())
            old_umask = os.umask(0o117)  # socket created 0660
            try:
                local.add_insecure_port(f"unix:{self.socket_path}")
                local.start()
            finally:
                os.umask(old_umask)
            os.chmod(self.socket_path, 0o660)
            if self.fast_socket_path is not None:
                self._fast_server = FastPathServer(self.core, self.fast_socket_path, max_message_bytes=daemon_config.max_message_bytes,
                                                   max_connections=daemon_config.max_local_connections)
                self._fast_server.start()
            self.peer_fetcher, self.peer_service = build_peers(self.config, self.core)
            self.core.peers = self.peer_fetcher
            if daemon_config.tcp_address:
                interceptors = (BearerTokenInterceptor(token),) if token else ()
                remote = self._new_server(servicer, options, interceptors)
                if self.peer_service is not None:
                    add_peer_service(self.peer_service, remote)  # peers: on the authenticated listener only
                self.tcp_port = listen(remote, daemon_config.tcp_address, tls, "daemon.tcp_address")
                remote.start()
            if daemon_config.metrics_address:
                self._metrics_server, _ = serve_metrics(daemon_config.metrics_address, self.core, self.peer_service)
        except BaseException:
            self._shutdown_servers(0)
            self._close_peers()
            chain.close(flush_timeout=0)
            raise
        self.publisher = IndexPublisher(chain, sink, self.config.publish, node=daemon_config.node,
                                        layouts=served_layouts(self.core.layouts), target=target,
                                        address=advertised_address(self.config, self.tcp_port),
                                        s3_location=s3_location_of(self.config))
        self.core.on_new_layout = lambda layout: self.publisher.request_resync()
        servicer.publisher = self.publisher
        if self.local_index is not None:
            self._sweeper = IndexSweeper(self.local_index)
        if self.config.publish.vllm_events:
            self.core.descriptions = BlockDescriptions(self.config.publish.block_descriptions)
            self.vllm_events = VllmEventPublisher(chain, self.core.descriptions, self.config.publish, node=daemon_config.node,
                                                  layouts=served_layouts(self.core.layouts))
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._reaper = threading.Thread(target=self._reap_loop, name="kvtier-reaper", daemon=True)
        self._reaper.start()
        pid_path_for(self.socket_path).write_text(f"{os.getpid()}\n")
        log.info("kvtier daemon serving on %s%s%s", self.socket_path,
                 f" (fast path {self.fast_socket_path})" if self.fast_socket_path else "",
                 f" and {daemon_config.tcp_address}" if daemon_config.tcp_address else "")

    def _new_server(self, servicer: DaemonServicer, options: list, interceptors: tuple) -> grpc.Server:
        server = grpc.server(
            ThreadPoolExecutor(self.config.daemon.workers, thread_name_prefix="kvtier-rpc"),
            options=options,
            interceptors=interceptors,
        )
        pb_grpc.add_KVTierDaemonServicer_to_server(servicer, server)
        if self.local_index is not None:
            add_index_service(self.local_index, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self._servers.append(server)
        return server

    def _reap_loop(self) -> None:
        while not self._stopped.wait(self.config.daemon.reaper_interval_s):
            try:
                self.core.reap()
                if self.core.peers is not None:
                    self.core.peers.warm_up()  # connect to new peers before a request needs them
            except Exception:  # the reaper must outlive any single failure
                log.exception("reaping expired leases and reservations failed")

    # ---- stop --------------------------------------------------------------------------------

    def _shutdown_servers(self, grace: float) -> None:
        events = [server.stop(grace) for server in self._servers]
        if self._fast_server is not None:
            self._fast_server.stop(grace)
            self._fast_server = None
        for event in events:
            event.wait()
        self._servers.clear()

    def stop(self) -> None:
        """Graceful stop: no new calls, in-flight calls finish, write-back flushed, tiers closed."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        daemon_config = self.config.daemon
        if hasattr(self, "_health"):
            self._health.enter_graceful_shutdown()
        self._shutdown_servers(daemon_config.grace_period_s)
        if self._metrics_server is not None:
            stop_metrics(self._metrics_server)
        if self.publisher is not None:
            self.publisher.close()
            close_sink = getattr(self.publisher.sink, "close", None)
            if close_sink is not None and self.publisher.sink is not self.local_index:
                close_sink()
        if self._sweeper is not None:
            self._sweeper.close()
        if self.vllm_events is not None:
            self.vllm_events.close()
        self._close_peers()  # before the chain: NIXL unregisters the arena before it is unmapped
        if self.core is not None:
            pending = self.core.chain.stats().pending_demotions
            if pending:
                log.info("flushing %d pending demotions (deadline %.0fs)", pending, daemon_config.flush_timeout_s)
            self.core.chain.close(flush_timeout=daemon_config.flush_timeout_s)
        for path in (self.socket_path, pid_path_for(self.socket_path)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        log.info("kvtier daemon stopped")

    def _close_peers(self) -> None:
        if self.peer_service is not None:
            self.peer_service.close()  # its block stream drops frames that reference the arena
            self.peer_service = None
        if self.peer_fetcher is not None:
            if self.core is not None:
                self.core.peers = None
            self.peer_fetcher.close()
            self.peer_fetcher = None

    def wait(self) -> None:
        self._stopped.wait()


def run_daemon(config: KVTierConfig, ready: threading.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    server = DaemonServer(config)
    with stop_on_signals() as stop:
        try:
            cpus = apply_cpu_affinity(config.daemon.cpu_affinity)  # before any thread starts: they inherit it
            if cpus is not None:
                log.info("running on CPUs %s (daemon.cpu_affinity=%s)", _cpu_list(cpus), config.daemon.cpu_affinity)
            server.start()
            if ready is not None:
                ready.set()
            print(f"kvtier daemon ready on {server.socket_path}", flush=True)
            wait_for_stop(stop)
        finally:
            server.stop()


def _cpu_list(cpus: set[int]) -> str:
    """``{0, 1, 2, 5}`` as ``0-2,5``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)
