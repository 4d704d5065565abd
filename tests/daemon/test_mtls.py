"""The TCP listener with mutual TLS: a client with a certificate from the configured CA gets in;
one without a certificate, or with one from another CA, does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.client import DaemonClient
from kvtier.errors import DaemonUnavailableError
from tests.certs import ca_pem as pem_of
from tests.certs import issue, make_ca
from tests.daemon.conftest import LAYOUT, start_on_tcp


def test_mutual_tls(daemon_root: Path) -> None:
    ca = make_ca("kvtier-test-ca")
    server_key, server_cert = issue(ca, "kvtier-daemon")
    client_key, client_cert = issue(ca, "vllm-worker")
    ca_pem = pem_of(ca)
    files = {"server.key": server_key, "server.crt": server_cert, "ca.crt": ca_pem}
    for name, data in files.items():
        (daemon_root / name).write_bytes(data)
    # 127.0.0.1, not localhost: grpc binding "localhost:N" succeeds on [::1] alone when another
    # process holds 127.0.0.1:N, and IPv4 clients are then refused.
    daemon, port = start_on_tcp(daemon_root, extra_env={
        "KVTIER_DAEMON_TLS_CERT_FILE": str(daemon_root / "server.crt"),
        "KVTIER_DAEMON_TLS_KEY_FILE": str(daemon_root / "server.key"),
        "KVTIER_DAEMON_TLS_CLIENT_CA_FILE": str(daemon_root / "ca.crt"),
    })
    try:
        with DaemonClient(f"127.0.0.1:{port}", tls_root_certificates=ca_pem, tls_client_cert=(client_key, client_cert)) as trusted:
            assert trusted.register_layout(LAYOUT).layout_id == LAYOUT.layout_id
        with DaemonClient(f"127.0.0.1:{port}", tls_root_certificates=ca_pem, timeout_s=3) as anonymous:
            with pytest.raises(DaemonUnavailableError):
                anonymous.stats()
        stranger_key, stranger_cert = issue(make_ca("another-ca"), "intruder")
        with DaemonClient(f"127.0.0.1:{port}", tls_root_certificates=ca_pem, tls_client_cert=(stranger_key, stranger_cert),
                          timeout_s=3) as stranger:
            with pytest.raises(DaemonUnavailableError):
                stranger.stats()
    finally:
        daemon.stop()
