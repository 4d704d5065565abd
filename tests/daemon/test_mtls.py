"""The TCP listener with mutual TLS: a client with a certificate from the configured CA gets in;
one without a certificate, or with one from another CA, does not."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest

from kvtier.client import DaemonClient
from kvtier.errors import DaemonUnavailableError
from tests.daemon.conftest import LAYOUT, start_on_tcp

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], common_name: str) -> tuple[bytes, bytes]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def test_mutual_tls(daemon_root: Path) -> None:
    ca = make_ca("kvtier-test-ca")
    server_key, server_cert = issue(ca, "kvtier-daemon")
    client_key, client_cert = issue(ca, "vllm-worker")
    ca_pem = ca[1].public_bytes(serialization.Encoding.PEM)
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
