"""Authentication of the TCP listener: a bearer token (constant-time compare) and/or mutual TLS.

The Unix socket needs none: its file mode (0660 in a 0750 folder) is the access control. The
standard health service is answered without credentials so orchestrator probes work.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import grpc
from pydantic import SecretStr

from kvtier.errors import ConfigError

_UNAUTHENTICATED_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def _deny(message: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Lets a call through only with metadata ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._missing = _deny("this kvtier endpoint requires 'authorization: Bearer <token>' metadata")
        self._wrong = _deny("the bearer token is not valid for this kvtier endpoint")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method in _UNAUTHENTICATED_METHODS:
            return continuation(handler_call_details)
        supplied = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        if supplied is None:
            return self._missing
        if not hmac.compare_digest(str(supplied).encode(), self._expected):
            return self._wrong
        return continuation(handler_call_details)


class TokenSettings(Protocol):
    auth_token: SecretStr | None
    auth_token_file: Path | None


class ListenerSecurity(TokenSettings, Protocol):
    """The settings of a TCP listener's security (``daemon``, ``index``), read by the helpers below."""

    tls_cert_file: Path | None
    tls_key_file: Path | None
    tls_client_ca_file: Path | None


def read_setting_file(path: Path | str | None, setting: str) -> bytes | None:
    """The bytes of a credential or certificate file named by ``setting``; None when unset."""
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {setting} {path}: {exc.strerror}") from exc


def resolve_token(config: TokenSettings, section: str = "daemon") -> str | None:
    """The configured token, from the setting or its file (whitespace stripped)."""
    if config.auth_token is not None:
        token = config.auth_token.get_secret_value()
    elif config.auth_token_file is not None:
        token = read_setting_file(config.auth_token_file, f"{section}.auth_token_file").decode().strip()
    else:
        return None
    if len(token) < 16:
        raise ConfigError(f"the {section} auth token must be at least 16 characters long")
    return token


def server_credentials(config: ListenerSecurity, section: str = "daemon") -> grpc.ServerCredentials | None:
    """TLS credentials for the TCP listener, or None for plaintext (then a token is required)."""
    if config.tls_cert_file is None and config.tls_key_file is None:
        if config.tls_client_ca_file is not None:
            raise ConfigError(f"{section}.tls_client_ca_file needs {section}.tls_cert_file and {section}.tls_key_file")
        return None
    if config.tls_cert_file is None or config.tls_key_file is None:
        raise ConfigError(f"set both {section}.tls_cert_file and {section}.tls_key_file for TLS")
    cert = read_setting_file(config.tls_cert_file, f"{section}.tls_cert_file")
    key = read_setting_file(config.tls_key_file, f"{section}.tls_key_file")
    client_ca = read_setting_file(config.tls_client_ca_file, f"{section}.tls_client_ca_file")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def listen(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None, setting: str) -> int:
    """Add the TCP port ``address`` to ``server`` (TLS when ``credentials``); the bound port.
    ``setting`` names the option in errors (``daemon.tcp_address``, ``index.address``)."""
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
        port, reason = 0, f" ({exc})"
    else:
        reason = ""
    if not port:
        raise ConfigError(f"{setting} {address!r}: cannot listen there{reason}; is the port in use, or the host not one of "
                          "this machine's addresses?")
    return port
