"""Building a daemon's peer side from the configuration: transports, fetcher, holder service."""

from __future__ import annotations

import logging
import os
import socket

from kvtier.config import KVTierConfig
from kvtier.daemon.core import DaemonCore
from kvtier.errors import ConfigError
from kvtier.transport.base import PeerTransport
from kvtier.transport.channel import PeerCredentials
from kvtier.transport.directory import open_directory
from kvtier.transport.fetcher import PeerFetcher
from kvtier.transport.nixl_path import NixlTransport, nixl_available
from kvtier.transport.service import PeerServicer
from kvtier.transport.zmq_stream import BlockStreamServer, ZmqStreamTransport

log = logging.getLogger(__name__)

_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def advertised_address(config: KVTierConfig, bound_port: int | None) -> str:
    """The address peers reach this daemon at: ``peer.advertise_address``, else the TCP
    listener's, with a wildcard host replaced by ``POD_IP`` or this host's address."""
    if config.peer.advertise_address:
        return config.peer.advertise_address
    tcp = config.daemon.tcp_address
    if not tcp:
        return ""
    host, _, port = tcp.rpartition(":")
    if host in _WILDCARDS:
        host = os.environ.get("POD_IP") or socket.gethostbyname(socket.gethostname())
    if bound_port:
        port = str(bound_port)
    return f"{host}:{port}"


def build_transports(config: KVTierConfig, core: DaemonCore) -> tuple[list[PeerTransport], NixlTransport | None]:
    """The data paths in order of preference, and the NIXL one (it also serves as holder)."""
    peer = config.peer
    host = core.chain.host
    stream = ZmqStreamTransport(host)
    nixl = None
    if peer.transport == "nixl" or (peer.transport == "auto" and nixl_available()):
        nixl = NixlTransport(host.arena, agent_name=f"kvtier-{config.daemon.node}-{core.instance[:12]}", backend=peer.nixl_backend,
                             progress_delay_us=peer.nixl_progress_delay_us)
    elif peer.transport == "auto":
        log.warning("NIXL is not installed: peers are pulled over the TCP path (pip install 'kvtier[peer]' for NIXL)")
    if peer.transport == "nixl":
        return [nixl], nixl
    if peer.transport == "tcp":
        return [stream], None
    return ([nixl] if nixl else []) + [stream], nixl


def build_peers(config: KVTierConfig, core: DaemonCore) -> tuple[PeerFetcher | None, PeerServicer | None]:
    """The fetcher (None without a shared index; with ``peer.enabled`` false it only finds blocks
    in the shared S3 bucket) and the holder's service (None without a TCP listener, or with peers
    disabled: other nodes cannot pull from this one)."""
    directory = open_directory(config)
    if directory is None:
        return None, None  # only this node's own index: no other node to pull from
    if not config.peer.enabled:
        fetcher = PeerFetcher(core.chain, directory, config.peer, node=config.daemon.node, transports=[],
                              credentials=PeerCredentials())
        return fetcher, None
    if config.peer.nixl_backend == "LIBFABRIC" and config.peer.transport == "tcp":
        raise ConfigError("peer.nixl_backend is LIBFABRIC but peer.transport is tcp: set peer.transport to nixl for EFA")
    transports, nixl = build_transports(config, core)
    fetcher = PeerFetcher(core.chain, directory, config.peer, node=config.daemon.node, transports=transports,
                          credentials=PeerCredentials.from_config(config))
    if not config.daemon.tcp_address:
        log.warning("daemon.tcp_address is not set: this daemon pulls blocks from peers but serves none to them")
        return fetcher, None
    stream, endpoint = None, ""
    if config.peer.transport != "nixl":
        bind_host = config.daemon.tcp_address.rpartition(":")[0].strip("[]")
        try:
            stream = BlockStreamServer(core, bind_host, config.peer.stream_port)
        except BaseException:
            fetcher.close()
            raise
        endpoint = f"tcp://{advertised_address(config, None).rpartition(':')[0]}:{stream.port}"
    return fetcher, PeerServicer(core, nixl=nixl.endpoint if nixl else None, stream=stream, stream_endpoint=endpoint,
                                 max_wait_s=config.peer.holder_wait_s)
