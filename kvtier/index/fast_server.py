"""The index's fast path: ``Score`` and ``LookupBlocks`` as msgpack frames on a TCP listener.

A Python gRPC call costs ~0.7 ms on each side on these machines, more than a 2,048-block score
itself (~0.3-0.5 ms); a frame here costs ~0.1 ms. Routers that score every request use this
listener (``index.fast_address``); everything else, and routers that want only gRPC, use the gRPC
service, which answers the same queries (both call :mod:`kvtier.index.queries`).

The wire is the daemon's fast-path framing (:mod:`kvtier.daemon.fast_wire`: a little-endian
``uint32`` length, then one msgpack map; nothing is unpickled). Requests and replies
(``docs/global-index.md`` has the table):

- ``Hello {protocol: 1, token}`` first. It authenticates: the index's bearer token, compared in
  constant time (``UNAUTHENTICATED`` otherwise), when one is set; a listener with mutual TLS and no token
  takes the client certificate instead. Nothing else is served before a Hello succeeds.
- ``Score {model, block_size, block_hashes | token_ids, lora_name, cache_salt, candidates}``:
  ``block_hashes`` as 16-byte hashes concatenated (or a list of hashes), ``token_ids`` as
  little-endian uint32 bytes (or a list of ints). Reply ``{prompt_blocks, block_size, scores}``,
  each score ``[node, blocks, tokens, score, [[tier, start_block, blocks], ...]]`` best first, tiers
  named ``gpu``, ``host``, ``disk``, ``s3``.
- ``LookupBlocks {model, block_size, block_hashes}``: reply ``{blocks}``, per hash a list of
  ``[node, tier]``.

Malformed requests get ``INVALID_ARGUMENT`` naming the field, with the gRPC service's messages;
the connection goes on. The listener refuses to start without a token or mutual TLS.
"""

from __future__ import annotations

import hmac
import socket
import ssl
from typing import Any

from kvtier.daemon.auth import ListenerSecurity
from kvtier.daemon.fast_wire import PROTOCOL_VERSION
from kvtier.daemon.frame_server import FrameServer, Request, Session, field_of
from kvtier.errors import AuthenticationError, ConfigError, InvalidRequestError
from kvtier.index import queries
from kvtier.index.base import KVIndex

TLS_HANDSHAKE_TIMEOUT_S = 10.0


def host_and_port(address: str, setting: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as a (host, port) pair; ConfigError naming ``setting`` otherwise."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{setting} {address!r} is not a host:port address")
    return host, int(port)


def _blocks(request: Request) -> bytes | list[bytes]:
    value = request.get("block_hashes", b"")
    if isinstance(value, bytes) or (isinstance(value, list) and all(isinstance(h, bytes) for h in value)):
        return value
    raise InvalidRequestError(f"{request.get('op')}: field 'block_hashes' must be bytes (16-byte hashes concatenated) or a list of bytes")


def _token_ids(request: Request) -> Any:
    value = request.get("token_ids", b"")
    if isinstance(value, bytes):
        return queries.unpack_token_ids(value)
    if isinstance(value, list) and all(type(t) is int for t in value):
        return value
    raise InvalidRequestError(f"{request.get('op')}: field 'token_ids' must be bytes (little-endian uint32s) or a list of integers")


class _Queries(Session):
    def __init__(self, index: KVIndex) -> None:
        self.index = index
        super().__init__({"Score": self.score, "LookupBlocks": self.lookup})

    def score(self, request: Request) -> dict[str, Any]:
        candidates = field_of(request, "candidates", list, [])
        if not all(isinstance(name, str) for name in candidates):
            raise InvalidRequestError("Score: every entry of 'candidates' must be a node name")
        answer = queries.score(
            self.index, field_of(request, "model", str), field_of(request, "block_size", int, 0),
            token_ids=_token_ids(request), block_hashes=_blocks(request),
            lora_name=field_of(request, "lora_name", str, ""), cache_salt=field_of(request, "cache_salt", str, ""),
            candidates=candidates,
        )
        return {
            "prompt_blocks": answer.prompt_blocks,
            "block_size": answer.block_size,
            "scores": [[s.node, s.blocks, s.tokens, s.score, [[run.tier.label, run.start, run.blocks] for run in s.runs]]
                       for s in answer.scores],
        }

    def lookup(self, request: Request) -> dict[str, Any]:
        found = queries.lookup(self.index, field_of(request, "model", str), field_of(request, "block_size", int, 0), _blocks(request))
        return {"blocks": [[[held.node, held.tier.label] for held in holders] for holders in found]}


class IndexFastServer(FrameServer):
    hello_says = "it carries the index's bearer token"

    def __init__(self, index: KVIndex, *, token: str | None, tls: ssl.SSLContext | None, max_message_bytes: int,
                 max_connections: int) -> None:
        if token is None and (tls is None or tls.verify_mode != ssl.CERT_REQUIRED):
            raise ConfigError("the index's fast path listens on TCP, so its calls must authenticate: set a token or mutual TLS")
        super().__init__(server_name="the index", max_message_bytes=max_message_bytes, max_connections=max_connections,
                         connections_setting="index.max_fast_connections")
        self.index = index
        self._token = token.encode() if token is not None else None
        self._tls = tls

    def listen(self, address: str) -> int:
        """Bind ``address`` (``host:port``; port 0 picks one), start serving; the bound port."""
        host, port = host_and_port(address, "index.fast_address")
        try:
            listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=128)
        except OSError as exc:
            raise ConfigError(f"index.fast_address {address!r}: cannot listen there ({exc.strerror}); is the port in use, "
                              "or the host not one of this machine's addresses?") from None
        bound = listener.getsockname()[1]
        self.start(listener)
        return bound

    def secure(self, connection: socket.socket) -> socket.socket:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is None:
            return connection
        connection.settimeout(TLS_HANDSHAKE_TIMEOUT_S)  # a client that never completes the handshake
        secured = self._tls.wrap_socket(connection, server_side=True)
        secured.settimeout(None)
        return secured

    def hello(self, request: Request) -> tuple[Session, dict[str, Any]]:
        protocol = field_of(request, "protocol", int)
        if protocol != PROTOCOL_VERSION:
            raise InvalidRequestError(f"the client speaks fast-path protocol {protocol}, this index {PROTOCOL_VERSION}: "
                                      "upgrade the older of the two, or use the index's gRPC service")
        if self._token is not None:  # as the gRPC listener: a token set is required, TLS or not
            supplied = request.get("token")
            if not isinstance(supplied, str) or not supplied:
                raise AuthenticationError("this index requires its bearer token in Hello's 'token' field", code="UNAUTHENTICATED")
            if not hmac.compare_digest(supplied.encode(), self._token):
                raise AuthenticationError("the bearer token is not valid for this index", code="UNAUTHENTICATED")
        return _Queries(self.index), {"protocol": PROTOCOL_VERSION, "max_message_bytes": self.max_message_bytes}


def server_tls_context(settings: ListenerSecurity, section: str = "index") -> ssl.SSLContext | None:
    """The fast listener's TLS context from the same files as the gRPC listener's, or None for
    plaintext; with ``tls_client_ca_file`` clients must present a certificate it signed."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None  # server_credentials, called first, has refused half a configuration
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        if settings.tls_client_ca_file is not None:
            context.load_verify_locations(cafile=settings.tls_client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{section}: cannot load the TLS certificate, key or client CA for the fast path: {exc}") from None
    return context
