"""Choosing a data path: EFA's LIBFABRIC is never replaced silently by something slower."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.config import load_config
from kvtier.errors import ConfigError
from kvtier.testing.daemon import LocalDaemon, free_port
from kvtier.testing.peers import peer_env
from kvtier.transport.setup import advertised_address

pytestmark = pytest.mark.timeout(60)


def test_a_daemon_that_cannot_load_libfabric_does_not_start(tmp_path: Path, redis_url: str) -> None:
    pytest.importorskip("nixl")  # the PyPI wheel lists LIBFABRIC but cannot load it off EFA nodes
    daemon = LocalDaemon(tmp_path / "efa", env=peer_env("node-efa", redis_url, "cfg", port=free_port(), transport="nixl",
                                                        KVTIER_PEER_NIXL_BACKEND="LIBFABRIC"), host_capacity="32MiB")
    with pytest.raises(RuntimeError, match="exited"):
        daemon.start()
    assert "NIXL backend LIBFABRIC cannot be instantiated" in daemon.log()
    assert "does not fall back" in daemon.log() and "EFA installer" in daemon.log()


def test_libfabric_with_the_tcp_path_is_a_contradiction(tmp_path: Path, redis_url: str) -> None:
    daemon = LocalDaemon(tmp_path / "tcp", env=peer_env("node-tcp", redis_url, "cfg", port=free_port(), transport="tcp",
                                                        KVTIER_PEER_NIXL_BACKEND="LIBFABRIC"), host_capacity="32MiB")
    with pytest.raises(RuntimeError, match="exited"):
        daemon.start()
    assert "set peer.transport to nixl for EFA" in daemon.log()


def test_the_advertised_address_is_reachable_not_a_wildcard(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(env={"KVTIER_DAEMON_TCP_ADDRESS": "0.0.0.0:7450", "KVTIER_DAEMON_AUTH_TOKEN": "x" * 16})
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    assert advertised_address(config, 7450) == "10.1.2.3:7450"
    config = load_config(env={"KVTIER_DAEMON_TCP_ADDRESS": "127.0.0.1:0", "KVTIER_PEER_ADVERTISE_ADDRESS": "node-a.example:7450"})
    assert advertised_address(config, 41000) == "node-a.example:7450"
    assert advertised_address(load_config(env={"KVTIER_DAEMON_TCP_ADDRESS": "127.0.0.1:0"}), 41000) == "127.0.0.1:41000"
    assert advertised_address(load_config(env={}), None) == ""


def test_peer_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="peer.transport"):
        load_config(env={"KVTIER_PEER_TRANSPORT": "rdma"})
    with pytest.raises(ConfigError, match="peer.nixl_backend"):
        load_config(env={"KVTIER_PEER_NIXL_BACKEND": "EFA"})
