"""The TCP data path: the holder streams an offer's blocks over ZeroMQ, straight from its arena.

Python gRPC moved blocks at 0.2-0.35 of a plain socket's rate here (four copies per block, one
message per chunk); ZeroMQ sends each block as one zero-copy frame from the arena and the puller
receives it straight into its slot (``recv_into``), about a socket's rate (``benchmarks/peer.py``).

Messages (ZeroMQ multipart, the holder a ROUTER, each fetch a fresh DEALER):

- request: ``[ticket (16 bytes), first (u32 LE), count (u32 LE)]``
- reply, per block in order: ``[b"B", data]``; or once, instead: ``[b"E", utf-8 message]``.

Authentication: the ticket. The holder makes one per offer (16 random bytes) and hands it out only
in the answer to an authenticated ``Offer`` call; a request with an unknown ticket, or whose
offer's lease has ended, gets ``E`` and nothing else. A fetch's socket is closed when it ends
(closed with no linger at its deadline), so a late reply never reaches another fetch.
"""

from __future__ import annotations

import hmac
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import zmq

from kvtier.errors import ConfigError
from kvtier.transport.base import Offer, PeerError, PeerTransport

if TYPE_CHECKING:
    from kvtier.daemon.core import DaemonCore, LeasedSlot
    from kvtier.tiers.host import HostTier, Slot

log = logging.getLogger(__name__)

TICKET_BYTES = 16
_REQUEST = struct.Struct("<II")
_BLOCK, _ERROR = b"B", b"E"


@dataclass(frozen=True, slots=True)
class _Ticketed:
    lessee: str
    lease_id: int
    slots: tuple[LeasedSlot, ...]


class BlockStreamServer:
    """The holder's side: one thread and one ROUTER socket serving every puller."""

    def __init__(self, core: DaemonCore, bind_host: str, port: int = 0) -> None:
        self.core = core
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone puller is an error, not a silent drop
        self._socket.setsockopt(zmq.SNDHWM, 0)  # frames reference the arena: queueing them costs no copy
        self._socket.setsockopt(zmq.LINGER, 0)
        host = "*" if bind_host in ("", "0.0.0.0", "::", "[::]") else bind_host
        try:
            if port:
                self._socket.bind(f"tcp://{host}:{port}")
                self.port = port
            else:
                self.port = self._socket.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as exc:
            self._context.destroy(linger=0)
            raise ConfigError(f"peer.stream_port {port}: cannot listen on {host} ({exc})") from exc
        self._lock = threading.Lock()
        self._tickets: dict[bytes, _Ticketed] = {}
        self._stop = threading.Event()
        self.served_blocks = 0
        self._thread = threading.Thread(target=self._run, name="kvtier-peer-stream", daemon=True)
        self._thread.start()

    def issue(self, lessee: str, lease_id: int, slots: tuple[LeasedSlot, ...]) -> bytes:
        """A new ticket for an offer (valid while its lease lives, or until :meth:`revoke`)."""
        ticket = os.urandom(TICKET_BYTES)
        with self._lock:
            self._forget_dead_locked()
            self._tickets[ticket] = _Ticketed(lessee, lease_id, slots)
        return ticket

    def revoke(self, lease_id: int) -> None:
        with self._lock:
            for ticket in [t for t, offer in self._tickets.items() if offer.lease_id == lease_id]:
                del self._tickets[ticket]

    def _forget_dead_locked(self) -> None:
        for ticket in [t for t, o in self._tickets.items() if not self.core.holds_lease(o.lessee, o.lease_id)]:
            del self._tickets[ticket]

    def _find(self, ticket: bytes) -> _Ticketed | None:
        with self._lock:
            for known, offer in self._tickets.items():
                if hmac.compare_digest(known, ticket):
                    return offer
        return None

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
                    continue
                frames = self._socket.recv_multipart()
                self._serve(frames)
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    return
                log.debug("block stream: %s", exc)  # e.g. a puller gone before its reply (ROUTER_MANDATORY)
            except Exception:  # the stream must outlive any one request
                log.exception("block stream request failed")

    def _serve(self, frames: list[bytes]) -> None:
        identity, request = frames[0], frames[1:]
        offer = None
        if len(request) == 2 and len(request[0]) == TICKET_BYTES and len(request[1]) == _REQUEST.size:
            offer = self._find(request[0])
        if offer is None or not self.core.holds_lease(offer.lessee, offer.lease_id):
            self._socket.send_multipart([identity, _ERROR, b"unknown or expired ticket: make a new offer"])
            return
        first, count = _REQUEST.unpack(request[1])
        if count == 0 or first + count > len(offer.slots):
            self._socket.send_multipart([identity, _ERROR, f"blocks {first}+{count} are not in an offer of {len(offer.slots)}".encode()])
            return
        arena = self.core.chain.host.arena
        for slot in offer.slots[first:first + count]:
            self._socket.send_multipart([identity, _BLOCK, arena.view(slot.offset, slot.nbytes)], copy=False)
        with self._lock:
            self.served_blocks += count

    def close(self) -> None:
        """Stop serving; every frame still queued is dropped (before the arena is unmapped)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._context.destroy(linger=0)


class ZmqStreamTransport(PeerTransport):
    """The puller's side of the TCP path."""

    name: ClassVar[str] = "tcp"

    def __init__(self, host: HostTier) -> None:
        self._host = host
        self._context = zmq.Context()

    def usable_for(self, offer: Offer) -> bool:
        return bool(offer.stream_endpoint) and len(offer.ticket) == TICKET_BYTES

    def read(self, offer: Offer, indexes: Sequence[int], slots: Sequence[Slot], deadline: float,
             arrived: Callable[[int], None] | None = None) -> None:
        if not self.usable_for(offer):
            raise PeerError(f"peer {offer.peer} offered no block stream", peer=offer.peer, reason="unsupported")
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        try:
            sock.connect(offer.stream_endpoint)
            start = 0
            while start < len(indexes):  # one request per consecutive run of the offer's blocks
                end = start + 1
                while end < len(indexes) and indexes[end] == indexes[end - 1] + 1:
                    end += 1
                sock.send_multipart([offer.ticket, _REQUEST.pack(indexes[start], end - start)])
                for position in range(start, end):
                    self._receive(sock, offer, indexes[position], self._host.slot_view(slots[position]), deadline)
                    if arrived is not None:
                        arrived(position)
                start = end
        finally:
            sock.close(linger=0)

    def _receive(self, sock: zmq.Socket, offer: Offer, index: int, target: memoryview, deadline: float) -> None:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0 or not sock.poll(left_ms, zmq.POLLIN):
            raise PeerError(f"peer {offer.peer}: block {index} did not arrive by the deadline", peer=offer.peer, reason="timeout")
        status = sock.recv()
        if status == _ERROR or not sock.getsockopt(zmq.RCVMORE):
            message = sock.recv().decode(errors="replace") if sock.getsockopt(zmq.RCVMORE) else "no reason given"
            raise PeerError(f"peer {offer.peer} refused its block stream: {message}", peer=offer.peer, reason="refused")
        if status != _BLOCK:
            raise PeerError(f"peer {offer.peer} sent an unknown block-stream message {status[:8]!r}", peer=offer.peer,
                            reason="invalid")
        received = sock.recv_into(target)
        if received != len(target) or sock.getsockopt(zmq.RCVMORE):
            raise PeerError(f"peer {offer.peer} sent {received} bytes for block {index} of {len(target)}", peer=offer.peer,
                            reason="invalid")

    def close(self) -> None:
        self._context.destroy(linger=0)
