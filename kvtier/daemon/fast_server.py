"""The daemon's fast path: the hot calls as msgpack frames on a second Unix socket.

A gRPC-Python call costs about half a millisecond on both ends; the calls a vLLM worker makes per
step (lookup, reserve, commit, abort, acquire, release, prefetch, disconnect) cost tens of
microseconds here, with the same :class:`DaemonCore` semantics and the same status names as the
gRPC API (``kvtier.daemon.status``). Admin calls (RegisterLayout, Stats, health) stay on gRPC.

Invariants:

- Each connection has its own thread and answers its requests in order, one at a time.
- The first request is ``Hello``: it binds the connection to one client id (later requests act
  for that client only) and checks that the client mapped this run's arena.
- When the last connection of a client closes (the client closed it, or its process died), the
  client's leases and reservations are released at once, instead of when they expire.
- A frame that is not one msgpack map, or a request with missing or mistyped fields, gets an
  ``INVALID_ARGUMENT`` reply and the connection goes on; a frame over ``max_message_bytes`` gets
  ``RESOURCE_EXHAUSTED`` and the connection is closed (its body is never read). Neither affects
  other connections.
- The socket is created mode 0660, like the gRPC one.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Histogram

from kvtier.chain.promotion import FetchBudget
from kvtier.daemon.core import DaemonCore
from kvtier.daemon.fast_wire import PROTOCOL_VERSION, FrameReader, FrameTooLargeError, encode
from kvtier.daemon.metrics import RPC_LATENCY
from kvtier.daemon.status import status_name_of
from kvtier.errors import InvalidRequestError, KVTierError, LayoutError

log = logging.getLogger(__name__)

Request = dict[str, Any]


def _field(request: Request, name: str, kind: type, default: Any = None) -> Any:
    value = request.get(name, default)
    if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {list: "a list", str: "a string", int: "an integer", bytes: "bytes"}.get(kind, kind.__name__)
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise InvalidRequestError(f"{request.get('op')}: field {name!r} must be {expected}, not {got}")
    return value


def _ids(request: Request, name: str) -> list[int]:
    ids = _field(request, name, list)
    if not all(type(i) is int for i in ids):
        raise InvalidRequestError(f"{request.get('op')}: every entry of {name!r} must be an integer")
    return ids


def _seconds(request: Request, name: str) -> float:
    milliseconds = _field(request, name, int, 0)
    if milliseconds < 0:
        raise InvalidRequestError(f"{request.get('op')}: {name!r} must not be negative")
    return milliseconds / 1000


@functools.cache
def _latency_of(method: str, code: str) -> Histogram:
    """The latency histogram's child for one method and code (``labels()`` costs microseconds per call)."""
    return RPC_LATENCY.labels(method=method, code=code)


class _Session:
    """One client's connection: its requests, dispatched to the core on behalf of ``client_id``."""

    def __init__(self, core: DaemonCore, client_id: str) -> None:
        self.core = core
        self.client_id = client_id
        self.handlers: dict[str, Callable[[Request], dict[str, Any]]] = {
            "Lookup": self.lookup, "Reserve": self.reserve, "Commit": self.commit, "Abort": self.abort,
            "Acquire": self.acquire, "Release": self.release, "Prefetch": self.prefetch, "Disconnect": self.disconnect,
        }

    def lookup(self, request: Request) -> dict[str, Any]:
        return {"tiers": self.core.lookup(_field(request, "layout_id", str), _field(request, "block_hashes", list),
                                          _field(request, "refresh", bool, False))}

    def reserve(self, request: Request) -> dict[str, Any]:
        outcomes = self.core.reserve(self.client_id, _field(request, "layout_id", str), _field(request, "block_hashes", list),
                                     _field(request, "block_nbytes", int, 0))
        return {"results": [
            [o.status.value, o.slot.offset, o.slot.nbytes, o.slot.reservation] if o.slot is not None else [o.status.value]
            for o in outcomes
        ]}

    def commit(self, request: Request) -> dict[str, Any]:
        checksums = _ids(request, "checksums") if request.get("checksums") is not None else None
        return {"committed": self.core.commit(self.client_id, _ids(request, "reservation_ids"), checksums)}

    def abort(self, request: Request) -> dict[str, Any]:
        return {"aborted": self.core.abort(self.client_id, _ids(request, "reservation_ids"))}

    def acquire(self, request: Request) -> dict[str, Any]:
        outcome = self.core.acquire(self.client_id, _field(request, "layout_id", str), _field(request, "block_hashes", list),
                                    _seconds(request, "ttl_ms"))
        return {
            "lease_id": outcome.lease_id,
            "slots": outcome.slots,  # LeasedSlot tuples: [block_hash, offset, nbytes, checksum] each
            "expires_in_ms": int(outcome.ttl_s * 1000),
        }

    def release(self, request: Request) -> dict[str, Any]:
        self.core.release(self.client_id, _field(request, "lease_id", int))
        return {}

    def prefetch(self, request: Request) -> dict[str, Any]:
        block_us, allowance_us = _field(request, "block_us", int, 0), _field(request, "allowance_us", int, 0)
        lease = bool(request.get("lease", False))
        outcome = self.core.prefetch(_field(request, "layout_id", str), _field(request, "block_hashes", list), _seconds(request, "wait_ms"),
                                     budget=FetchBudget(block_us / 1e6, allowance_us / 1e6) if allowance_us > 0 else None,
                                     lease_for=self.client_id if lease else None, lease_ttl_s=_seconds(request, "lease_ttl_ms"))
        reply: dict[str, Any] = {"host_blocks": outcome.host_blocks, "done": outcome.done, "gave_up": outcome.gave_up}
        if outcome.lease is not None:
            reply.update(lease_id=outcome.lease.lease_id, slots=outcome.lease.slots, expires_in_ms=int(outcome.lease.ttl_s * 1000))
        return reply

    def disconnect(self, request: Request) -> dict[str, Any]:
        leases, reservations = self.core.disconnect(self.client_id)
        return {"released_leases": leases, "aborted_reservations": reservations}


class FastPathServer:
    def __init__(self, core: DaemonCore, socket_path: Path, *, max_message_bytes: int, max_connections: int) -> None:
        self.core = core
        self.socket_path = socket_path
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._connections_of: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)  # created 0660
        try:
            listener.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o660)
        listener.listen(128)
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
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass

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
                             f"the daemon already serves {self.max_connections} fast-path connections (daemon.max_local_connections)")
                continue
            thread.start()

    @staticmethod
    def _refuse(connection: socket.socket, code: str, message: str) -> None:
        try:
            connection.sendall(encode({"error": code, "message": message}))
        except OSError:
            pass
        connection.close()

    def _serve(self, connection: socket.socket) -> None:
        session: _Session | None = None
        reader = FrameReader(connection, self.max_message_bytes)
        try:
            session = self._handshake(connection, reader)
            while session is not None and self._serve_one(connection, reader, session):
                pass
        finally:
            with self._lock:
                del self._connections[connection]
                last = session is not None and self._connections_of[session.client_id] == 1
                if session is not None:
                    self._connections_of[session.client_id] -= 1
                    if last:
                        del self._connections_of[session.client_id]
            connection.close()
            if last and not self._stopping.is_set():
                self._end_session(session.client_id)

    def _end_session(self, client_id: str) -> None:
        try:
            leases, reservations = self.core.disconnect(client_id)
        except Exception:
            log.exception("releasing the slots of client %r after its last connection closed failed", client_id)
            return
        if leases or reservations:
            log.info("client %r closed its last connection holding %d leases and %d reservations; released them",
                     client_id, leases, reservations)

    def _handshake(self, connection: socket.socket, reader: FrameReader) -> _Session | None:
        """Serve requests until a Hello succeeds (a session) or the connection ends (None)."""
        while True:
            reply: dict[str, Any]
            try:
                request = reader.receive()
                if request is None:
                    return None
                if request.get("op") != "Hello":
                    raise LayoutError("send Hello first: it names the client and the daemon instance whose arena it mapped")
                protocol = _field(request, "protocol", int)
                if protocol != PROTOCOL_VERSION:
                    raise LayoutError(f"the client speaks fast-path protocol {protocol}, this daemon {PROTOCOL_VERSION}: "
                                      "upgrade the older of the two, or disable the client's fast path")
                client_id = _field(request, "client_id", str)
                self.core.check_client_id(client_id)
                self.core.check_instance(_field(request, "daemon_instance", str, ""))
                session = _Session(self.core, client_id)
                reply = {"ok": {"protocol": PROTOCOL_VERSION, "daemon_instance": self.core.instance,
                                "max_message_bytes": self.max_message_bytes}}
            except FrameTooLargeError as exc:
                self._refuse(connection, "RESOURCE_EXHAUSTED", str(exc))
                return None
            except KVTierError as exc:
                session, reply = None, {"error": status_name_of(exc), "message": str(exc)}
            except OSError:
                return None
            with self._lock:
                if session is not None:
                    self._connections_of[client_id] += 1
            try:
                connection.sendall(encode(reply))
            except OSError:
                return session  # counted: _serve's cleanup ends it
            if session is not None:
                return session

    def _serve_one(self, connection: socket.socket, reader: FrameReader, session: _Session) -> bool:
        """Answer one request; False when the connection is done."""
        try:
            request = reader.receive()
        except FrameTooLargeError as exc:
            self._refuse(connection, "RESOURCE_EXHAUSTED", str(exc))
            return False
        except InvalidRequestError as exc:
            return self._send(connection, {"error": "INVALID_ARGUMENT", "message": str(exc)})
        except OSError:
            return False
        if request is None:
            return False
        start = time.perf_counter()
        op = request.get("op")
        handler = session.handlers.get(op) if isinstance(op, str) else None
        if self._stopping.is_set():
            code, reply = "UNAVAILABLE", {"error": "UNAVAILABLE", "message": "the daemon is shutting down"}
        elif handler is None:
            code = "UNIMPLEMENTED"
            reply = {"error": code, "message": f"unknown operation {op!r}; the fast path serves {sorted(session.handlers)}"}
        else:
            try:
                reply, code = {"ok": handler(request)}, "OK"
            except KVTierError as exc:
                code = status_name_of(exc)
                reply = {"error": code, "message": str(exc)}
            except Exception:
                code = "INTERNAL"
                log.exception("fast-path %s failed", op)
                reply = {"error": code, "message": f"{op} failed inside the daemon; see its log"}
            _latency_of(op, code).observe(time.perf_counter() - start)
        return self._send(connection, reply)

    @staticmethod
    def _send(connection: socket.socket, reply: dict[str, Any]) -> bool:
        try:
            connection.sendall(encode(reply))
            return True
        except OSError:
            return False
