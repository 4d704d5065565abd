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
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client import Histogram

from kvtier.chain.promotion import FetchBudget
from kvtier.daemon.core import DaemonCore
from kvtier.daemon.fast_wire import PROTOCOL_VERSION
from kvtier.daemon.frame_server import FrameServer, Request, Session, field_of
from kvtier.daemon.metrics import RPC_LATENCY
from kvtier.errors import InvalidRequestError, LayoutError

log = logging.getLogger(__name__)

def _ids(request: Request, name: str) -> list[int]:
    ids = field_of(request, name, list)
    if not all(type(i) is int for i in ids):
        raise InvalidRequestError(f"{request.get('op')}: every entry of {name!r} must be an integer")
    return ids


def _seconds(request: Request, name: str) -> float:
    milliseconds = field_of(request, name, int, 0)
    if milliseconds < 0:
        raise InvalidRequestError(f"{request.get('op')}: {name!r} must not be negative")
    return milliseconds / 1000


@functools.cache
def _latency_of(method: str, code: str) -> Histogram:
    """The latency histogram's child for one method and code (``labels()`` costs microseconds per call)."""
    return RPC_LATENCY.labels(method=method, code=code)


class _Session(Session):
    """One client's connection: its requests, dispatched to the core on behalf of ``client_id``."""

    def __init__(self, core: DaemonCore, client_id: str) -> None:
        self.core = core
        self.client_id = client_id
        super().__init__({
            "Lookup": self.lookup, "Reserve": self.reserve, "Commit": self.commit, "Abort": self.abort,
            "Acquire": self.acquire, "Release": self.release, "Prefetch": self.prefetch, "Disconnect": self.disconnect,
        })

    def lookup(self, request: Request) -> dict[str, Any]:
        return {"tiers": self.core.lookup(field_of(request, "layout_id", str), field_of(request, "block_hashes", list),
                                          field_of(request, "refresh", bool, False))}

    def reserve(self, request: Request) -> dict[str, Any]:
        outcomes = self.core.reserve(self.client_id, field_of(request, "layout_id", str), field_of(request, "block_hashes", list),
                                     field_of(request, "block_nbytes", int, 0))
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
        outcome = self.core.acquire(self.client_id, field_of(request, "layout_id", str), field_of(request, "block_hashes", list),
                                    _seconds(request, "ttl_ms"))
        return {
            "lease_id": outcome.lease_id,
            "slots": outcome.slots,  # LeasedSlot tuples: [block_hash, offset, nbytes, checksum] each
            "expires_in_ms": int(outcome.ttl_s * 1000),
        }

    def release(self, request: Request) -> dict[str, Any]:
        self.core.release(self.client_id, field_of(request, "lease_id", int))
        return {}

    def prefetch(self, request: Request) -> dict[str, Any]:
        block_us, allowance_us = field_of(request, "block_us", int, 0), field_of(request, "allowance_us", int, 0)
        lease = bool(request.get("lease", False))
        outcome = self.core.prefetch(field_of(request, "layout_id", str), field_of(request, "block_hashes", list), _seconds(request, "wait_ms"),
                                     budget=FetchBudget(block_us / 1e6, allowance_us / 1e6) if allowance_us > 0 else None,
                                     lease_for=self.client_id if lease else None, lease_ttl_s=_seconds(request, "lease_ttl_ms"))
        reply: dict[str, Any] = {"host_blocks": outcome.host_blocks, "done": outcome.done, "gave_up": outcome.gave_up}
        if outcome.lease is not None:
            reply.update(lease_id=outcome.lease.lease_id, slots=outcome.lease.slots, expires_in_ms=int(outcome.lease.ttl_s * 1000))
        return reply

    def disconnect(self, request: Request) -> dict[str, Any]:
        leases, reservations = self.core.disconnect(self.client_id)
        return {"released_leases": leases, "aborted_reservations": reservations}


class FastPathServer(FrameServer):
    hello_says = "it names the client and the daemon instance whose arena it mapped"

    def __init__(self, core: DaemonCore, socket_path: Path, *, max_message_bytes: int, max_connections: int) -> None:
        super().__init__(server_name="the daemon", max_message_bytes=max_message_bytes, max_connections=max_connections,
                         connections_setting="daemon.max_local_connections")
        self.core = core
        self.socket_path = socket_path
        self._connections_of: Counter[str] = Counter()  # under self._lock

    def start(self) -> None:  # type: ignore[override]
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)  # created 0660
        try:
            listener.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o660)
        listener.listen(128)
        super().start(listener)

    def stop(self, grace_s: float) -> None:
        super().stop(grace_s)
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass

    def hello(self, request: Request) -> tuple[Session, dict[str, Any]]:
        protocol = field_of(request, "protocol", int)
        if protocol != PROTOCOL_VERSION:
            raise LayoutError(f"the client speaks fast-path protocol {protocol}, this daemon {PROTOCOL_VERSION}: "
                              "upgrade the older of the two, or disable the client's fast path")
        client_id = field_of(request, "client_id", str)
        self.core.check_client_id(client_id)
        self.core.check_instance(field_of(request, "daemon_instance", str, ""))
        fields = {"protocol": PROTOCOL_VERSION, "daemon_instance": self.core.instance, "max_message_bytes": self.max_message_bytes}
        return _Session(self.core, client_id), fields

    def session_started(self, session: Session) -> None:
        assert isinstance(session, _Session)
        with self._lock:
            self._connections_of[session.client_id] += 1

    def session_ended(self, session: Session) -> None:
        """When a client's last connection closes (it closed it, or its process died), its leases
        and reservations are released at once, instead of when they expire."""
        assert isinstance(session, _Session)
        client_id = session.client_id
        with self._lock:
            self._connections_of[client_id] -= 1
            last = self._connections_of[client_id] == 0
            if last:
                del self._connections_of[client_id]
        if last and not self.stopping:
            self._end_session(client_id)

    def _end_session(self, client_id: str) -> None:
        try:
            leases, reservations = self.core.disconnect(client_id)
        except Exception:
            log.exception("releasing the slots of client %r after its last connection closed failed", client_id)
            return
        if leases or reservations:
            log.info("client %r closed its last connection holding %d leases and %d reservations; released them",
                     client_id, leases, reservations)

    def observe(self, op: str, code: str, seconds: float) -> None:
        _latency_of(op, code).observe(seconds)
