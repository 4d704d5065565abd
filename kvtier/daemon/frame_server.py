"""A server of msgpack frames (:mod:`kvtier.daemon.fast_wire`) on a listening socket: what the
daemon's fast path (Unix socket) and the index's fast path (TCP) have in common.

Invariants:

- Each connection has its own thread and answers its requests in order, one at a time.
- The first request is ``Hello``; :meth:`FrameServer.hello` accepts it (a session: the handlers
  later requests reach) or refuses it with a kvtier error, after which the client may say Hello
  again. No other request is served before a Hello succeeds.
- A frame that is not one msgpack map, or a request with missing or mistyped fields, gets an
  ``INVALID_ARGUMENT`` reply and the connection goes on; a frame over ``max_message_bytes`` gets
  ``RESOURCE_EXHAUSTED`` and the connection is closed (its body is never read). An unexpected
  failure inside a handler is ``INTERNAL`` with a message pointing at the server's log. Neither
  affects other connections.
- :meth:`FrameServer.stop` takes no new connections, lets requests being served finish within
  the grace period, and answers later ones ``UNAVAILABLE``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from kvtier.daemon.fast_wire import FrameReader, FrameTooLargeError, encode
from kvtier.daemon.status import status_name_of
from kvtier.errors import InvalidRequestError, KVTierError

log = logging.getLogger(__name__)

Request = dict[str, Any]
Handler = Callable[[Request], dict[str, Any]]


def field_of(request: Request, name: str, kind: type, default: Any = None) -> Any:
    """A request's field of type ``kind`` (``default`` when absent); InvalidRequestError naming it otherwise."""
    value = request.get(name, default)
    if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {list: "a list", str: "a string", int: "an integer", bytes: "bytes"}.get(kind, kind.__name__)
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise InvalidRequestError(f"{request.get('op')}: field {name!r} must be {expected}, not {got}")
    return value


class Session:
    """What a successful Hello opens: the operations the connection may call from then on."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers


class FrameServer(ABC):
    """Accepts connections on a listening socket and serves each on a thread of its own."""

    def __init__(self, *, server_name: str, max_message_bytes: int, max_connections: int, connections_setting: str) -> None:
        self.server_name = server_name  # "the daemon", "the index": in messages
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        self._connections_setting = connections_setting
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    # ---- what a server defines ---------------------------------------------------------------

    hello_says = "it opens the session"  # why a Hello comes first, in the refusal of anything else

    @abstractmethod
    def hello(self, request: Request) -> tuple[Session, dict[str, Any]]:
        """Accept a Hello: the session and the ``ok`` reply's fields. Raise a kvtier error to refuse it."""

    def secure(self, connection: socket.socket) -> socket.socket:
        """The accepted connection as requests are read from it (TLS servers wrap it here, on the
        connection's own thread). An ``OSError`` drops the connection."""
        return connection

    def session_started(self, session: Session) -> None:
        """Called when a Hello succeeded, before its reply is sent."""

    def session_ended(self, session: Session) -> None:
        """Called once the connection of a started session has closed."""

    def observe(self, op: str, code: str, seconds: float) -> None:
        """Called after every request past the Hello (latency metrics)."""

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, listener: socket.socket) -> None:
        """Serve the connections of ``listener`` (bound and listening)."""
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, name="kvtier-fast-accept", daemon=True)
        self._acceptor.start()

    def stop(self, grace_s: float) -> None:
        """Take no new requests; requests being served finish (within ``grace_s``); close everything."""
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            connections = dict(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RD)  # idle readers see EOF; a busy one still replies
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._acceptor is not None:
            self._acceptor.join(1.0)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # ---- connections -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed by stop()
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    thread = threading.Thread(target=self._serve, args=(connection,), name="kvtier-fast", daemon=True)
                    self._connections[connection] = thread
            if full:
                self._refuse(connection, "RESOURCE_EXHAUSTED",
                             f"{self.server_name} already serves {self.max_connections} fast-path connections "
                             f"({self._connections_setting})")
                continue
            thread.start()

    @staticmethod
    def _refuse(connection: socket.socket, code: str, message: str) -> None:
        try:
            connection.sendall(encode({"error": code, "message": message}))
        except OSError:
            pass
        connection.close()

    def _serve(self, accepted: socket.socket) -> None:
        session: Session | None = None
        connection = accepted
        try:
            connection = self.secure(accepted)
            reader = FrameReader(connection, self.max_message_bytes)
            session = self._handshake(connection, reader)
            while session is not None and self._serve_one(connection, reader, session):
                pass
        except OSError as exc:  # a TLS handshake that failed, a peer that vanished
            log.debug("%s: a fast-path connection ended: %s", self.server_name, exc)
        finally:
            with self._lock:
                del self._connections[accepted]
            connection.close()
            if session is not None:
                self.session_ended(session)

    def _handshake(self, connection: socket.socket, reader: FrameReader) -> Session | None:
        """Serve requests until a Hello succeeds (a session) or the connection ends (None)."""
        while True:
            reply: dict[str, Any]
            session: Session | None = None
            try:
                request = reader.receive()
                if request is None:
                    return None
                if request.get("op") == "Hello":
                    session, fields = self.hello(request)
                    reply = {"ok": fields}
                else:
                    reply = {"error": "FAILED_PRECONDITION", "message": f"send Hello first: {self.hello_says}"}
            except FrameTooLargeError as exc:
                self._refuse(connection, "RESOURCE_EXHAUSTED", str(exc))
                return None
            except KVTierError as exc:
                reply = {"error": status_name_of(exc), "message": str(exc)}
            if session is not None:
                self.session_started(session)
            if not self._send(connection, reply):
                return session  # started: _serve's cleanup ends it
            if session is not None:
                return session

    def _serve_one(self, connection: socket.socket, reader: FrameReader, session: Session) -> bool:
        """Answer one request; False when the connection is done."""
        try:
            request = reader.receive()
        except FrameTooLargeError as exc:
            self._refuse(connection, "RESOURCE_EXHAUSTED", str(exc))
            return False
        except InvalidRequestError as exc:
            return self._send(connection, {"error": "INVALID_ARGUMENT", "message": str(exc)})
        if request is None:
            return False
        start = time.perf_counter()
        op = request.get("op")
        handler = session.handlers.get(op) if isinstance(op, str) else None
        if self._stopping.is_set():
            reply = {"error": "UNAVAILABLE", "message": f"{self.server_name} is shutting down"}
        elif handler is None:
            reply = {"error": "UNIMPLEMENTED", "message": f"unknown operation {op!r}; the fast path serves {sorted(session.handlers)}"}
        else:
            try:
                reply, code = {"ok": handler(request)}, "OK"
            except KVTierError as exc:
                code = status_name_of(exc)
                reply = {"error": code, "message": str(exc)}
            except Exception:
                code = "INTERNAL"
                log.exception("fast-path %s failed", op)
                reply = {"error": code, "message": f"{op} failed inside {self.server_name}; see its log"}
            self.observe(str(op), code, time.perf_counter() - start)
        return self._send(connection, reply)

    @staticmethod
    def _send(connection: socket.socket, reply: dict[str, Any]) -> bool:
        try:
            connection.sendall(encode(reply))
            return True
        except OSError:
            return False
