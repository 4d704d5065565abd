"""The client's end of the daemon's fast path (``kvtier.daemon.fast_server``): pooled Unix-socket
connections carrying msgpack frames.

Thread-safe: a call takes an idle connection from the pool (or opens one and says Hello) and
returns it when the reply has arrived, so concurrent callers never share a connection and each
connection carries one request at a time. A connection that times out or breaks is closed, never
reused: a late reply must not be read as the answer to the next request. A pooled connection found
broken is retried once on a new one, whose Hello tells a client of a restarted daemon to register
again (:class:`LayoutError`) instead of reporting the daemon down. Connections live as
long as the channel; the daemon ends the client's session (releasing its leases and
reservations) when the last one closes.
"""

from __future__ import annotations

import socket
import struct
import threading
from abc import ABC, abstractmethod
from typing import Any

from kvtier.client.status import error_for_status
from kvtier.daemon.fast_wire import PROTOCOL_VERSION, FrameReader, FrameTooLargeError, encode
from kvtier.errors import DaemonTimeoutError, DaemonUnavailableError, InvalidRequestError, KVTierError

# Replies are bounded by the daemon's own limit; this only guards against a broken peer.
_MAX_REPLY_BYTES = 1 << 30


class FrameConnection:
    """One connected socket with its frame reader, answering one request at a time. Timeouts are
    the kernel's (SO_RCVTIMEO/SO_SNDTIMEO) on a blocking socket, which costs no extra poll() per
    read the way Python's socket timeouts do. Failures raise ``unavailable`` (the connection
    broke or closed) or ``timed_out`` (no answer within the timeout), each with the status name
    as ``code``; ``peer`` names the other end in their messages ("the daemon at /run/...")."""

    def __init__(self, sock: socket.socket, peer: str, timeout_s: float, *,
                 unavailable: type[KVTierError] = DaemonUnavailableError, timed_out: type[KVTierError] = DaemonTimeoutError) -> None:
        self.sock = sock
        self.peer = peer
        self.reader = FrameReader(self.sock, _MAX_REPLY_BYTES)
        self._unavailable = unavailable
        self._timed_out = timed_out
        self.timeout_s = -1.0
        self.set_timeout(timeout_s)

    @classmethod
    def unix(cls, path: str, timeout_s: float) -> FrameConnection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection = cls(sock, f"the daemon at {path}", timeout_s)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return connection

    def set_timeout(self, timeout_s: float) -> None:
        if timeout_s != self.timeout_s:
            seconds = int(timeout_s)
            timeval = struct.pack("ll", seconds, int((timeout_s - seconds) * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self.timeout_s = timeout_s

    def exchange(self, frame: bytes, op: str) -> dict[str, Any]:
        self.send(frame, op)
        return self.receive(op)

    def send(self, frame: bytes, op: str) -> None:
        try:
            self.sock.sendall(frame)
        except BlockingIOError:  # SO_SNDTIMEO expired
            raise self._timed_out(f"{op}: {self.peer} did not take the request within {self.timeout_s}s", code="DEADLINE_EXCEEDED") from None
        except OSError as exc:
            raise self._unavailable(f"{op}: the connection to {self.peer} broke ({exc})", code="UNAVAILABLE") from None

    def receive(self, op: str) -> dict[str, Any]:
        try:
            reply = self.reader.receive()
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise self._timed_out(f"{op}: {self.peer} did not answer within {self.timeout_s}s", code="DEADLINE_EXCEEDED") from None
        except (OSError, FrameTooLargeError, InvalidRequestError) as exc:
            raise self._unavailable(f"{op}: the connection to {self.peer} broke ({exc})", code="UNAVAILABLE") from None
        if reply is None:
            raise self._unavailable(f"{op}: {self.peer} closed the connection", code="UNAVAILABLE")
        if not ("ok" in reply and isinstance(reply["ok"], dict)) and "error" not in reply:
            raise self._unavailable(f"{op}: {self.peer} sent a reply this client cannot read: {sorted(reply)}", code="UNAVAILABLE")
        return reply

    def close(self) -> None:
        self.sock.close()


class FrameChannel(ABC):
    """Pooled connections to one fast-path server (see the module docstring). A server's channel
    says how to connect (:meth:`_connect`), what its Hello carries (:meth:`_hello_fields`) and
    which kvtier error a failure status becomes (:meth:`_error`)."""

    peer: str  # the server, in messages ("the daemon")
    limit_setting: str  # the setting that bounds its messages
    unavailable: type[KVTierError]  # what its FrameConnections raise when a connection breaks

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.max_message_bytes = _MAX_REPLY_BYTES  # lowered to the server's limit by the first Hello
        self._lock = threading.Lock()
        self._idle: list[FrameConnection] = []
        self._closed = False

    @abstractmethod
    def _connect(self) -> FrameConnection:
        """A new connected socket; raise ``unavailable`` naming the address when none can be made."""

    @abstractmethod
    def _hello_fields(self) -> dict[str, Any]:
        """What the Hello carries besides its op and protocol."""

    def _error(self, code: str, message: str) -> Exception:
        return error_for_status(code, message)

    def call(self, op: str, fields: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        """Send one request and return its ``ok`` map; raise the kvtier error of a failure."""
        return self.start(op, fields, timeout_s).result()

    def start(self, op: str, fields: dict[str, Any], timeout_s: float | None = None) -> PendingReply:
        """Send one request and return without waiting for its reply (:meth:`PendingReply.result`
        waits). Its connection stays out of the pool until then, so other calls go on meanwhile."""
        frame = encode({"op": op, **fields})
        connection, reused = self._take()  # the first Hello tells max_message_bytes
        if len(frame) - 4 > self.max_message_bytes:
            self._give_back(connection)
            raise self._error("RESOURCE_EXHAUSTED", f"{op}: a {len(frame) - 4}-byte request exceeds {self.peer}'s "
                              f"{self.max_message_bytes}-byte limit ({self.limit_setting}); send fewer blocks per call")
        try:
            self._send(connection, frame, op, timeout_s)
        except self.unavailable as exc:
            if not (reused and exc.code == "UNAVAILABLE"):
                raise
            connection, reused = self._send_on_new_connection(frame, op, timeout_s), False  # see PendingReply.result
        return PendingReply(self, connection, frame, op, timeout_s, reused)

    def _send_on_new_connection(self, frame: bytes, op: str, timeout_s: float | None) -> FrameConnection:
        connection = self._open()
        self._send(connection, frame, op, timeout_s)
        return connection

    def _send(self, connection: FrameConnection, frame: bytes, op: str, timeout_s: float | None) -> None:
        try:
            connection.set_timeout(timeout_s or self.timeout_s)
            connection.send(frame, op)
        except BaseException:
            connection.close()
            raise

    def _take(self) -> tuple[FrameConnection, bool]:
        """A connection, and whether it comes from the pool (it may have gone stale there)."""
        with self._lock:
            if self._closed:
                raise self._error("UNAVAILABLE", "the client was closed")
            if self._idle:
                return self._idle.pop(), True
        return self._open(), False

    def _give_back(self, connection: FrameConnection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(connection)
                return
        connection.close()

    def _open(self) -> FrameConnection:
        connection = self._connect()
        try:
            reply = connection.exchange(encode({"op": "Hello", "protocol": PROTOCOL_VERSION, **self._hello_fields()}), "Hello")
        except BaseException:
            connection.close()
            raise
        if "error" in reply:
            connection.close()
            raise self._error(str(reply["error"]), f"Hello: {reply.get('message', reply['error'])}")
        self.max_message_bytes = int(reply["ok"].get("max_message_bytes", _MAX_REPLY_BYTES))
        return connection

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class FastChannel(FrameChannel):
    """The daemon's fast path on its Unix socket, for one client of one daemon run."""

    peer = "the daemon"
    limit_setting = "daemon.max_message_bytes"
    unavailable = DaemonUnavailableError

    def __init__(self, path: str, client_id: str, daemon_instance: str, timeout_s: float) -> None:
        super().__init__(timeout_s)
        self.path = path
        self.client_id = client_id
        self.daemon_instance = daemon_instance

    def _connect(self) -> FrameConnection:
        try:
            return FrameConnection.unix(self.path, self.timeout_s)
        except OSError as exc:
            raise DaemonUnavailableError(f"cannot reach the daemon's fast path at {self.path}: {exc}", code="UNAVAILABLE") from None

    def _hello_fields(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "daemon_instance": self.daemon_instance}


class PendingReply:
    """A request sent on its own connection whose reply has not been read yet."""

    def __init__(self, channel: FrameChannel, connection: FrameConnection, frame: bytes, op: str, timeout_s: float | None,
                 reused: bool) -> None:
        self._channel = channel
        self._connection = connection
        self._frame = frame
        self._op = op
        self._timeout_s = timeout_s
        self._reused = reused

    def result(self) -> dict[str, Any]:
        """Wait for the reply (call once) and return its ``ok`` map; raise the kvtier error of a
        failure. The connection goes back to the pool if it answered and is closed if not."""
        channel, op = self._channel, self._op
        try:
            reply = self._connection.receive(op)
        except channel.unavailable as exc:
            self._connection.close()
            if not (self._reused and exc.code == "UNAVAILABLE"):
                raise
            # A pooled connection that broke (not one that timed out) most likely belonged to a
            # daemon that has since restarted. A fresh connection says Hello again, and a restarted
            # daemon answers that the arena changed (LayoutError: register again), not "down".
            connection = channel._send_on_new_connection(self._frame, op, self._timeout_s)
            return PendingReply(channel, connection, self._frame, op, self._timeout_s, reused=False).result()
        except BaseException:
            self._connection.close()
            raise
        else:
            channel._give_back(self._connection)
        if "error" in reply:
            raise channel._error(str(reply["error"]), f"{op}: {reply.get('message', reply['error'])}")
        return reply["ok"]
