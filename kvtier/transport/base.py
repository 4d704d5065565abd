"""What a peer offers and the interface every data path implements.

A pull is: ask the holder for an :class:`Offer` (it pins the blocks and says where they are),
reserve host slots here, have a :class:`PeerTransport` move the offered bytes into them, check
every block, commit the good ones, release the offer. Transports only move bytes: the checks
(layout, size, checksum) belong to the fetcher, so no transport can let a bad block through.

Invariant of :meth:`PeerTransport.read`: when it returns, every target slot holds the offered
bytes as the holder sent them; when it raises (or its deadline passes) nothing of the transfer is
still running, so the slots may be reused at once; the caller aborts them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kvtier.errors import KVTierError

if TYPE_CHECKING:
    from kvtier.tiers.host import Slot


class PeerError(KVTierError):
    """A peer could not serve a fetch (unreachable, refused, timed out, lied): a miss here."""

    def __init__(self, message: str, *, peer: str = "", reason: str = "failed") -> None:
        super().__init__(message)
        self.peer = peer
        self.reason = reason  # a counter name: unreachable, refused, timeout, invalid, corrupt, failed


@dataclass(frozen=True, slots=True)
class OfferedBlock:
    block_hash: bytes
    offset: int  # in the holder's arena
    nbytes: int
    checksum: int


@dataclass(frozen=True, slots=True)
class NixlEndpoint:
    """What a puller needs to READ a holder's arena with NIXL."""

    agent: str
    metadata: bytes
    arena_base: int
    backend: str


@dataclass(frozen=True, slots=True)
class Offer:
    """Blocks a holder pinned for a puller (lease ``lease_id``), in the order they were asked for."""

    peer: str  # the holder's node name
    lease_id: int
    ttl_s: float
    blocks: tuple[OfferedBlock, ...]
    instance: str
    nixl: NixlEndpoint | None = None
    stream_endpoint: str = ""  # the TCP path: the holder's block stream ("tcp://host:port")
    ticket: bytes = b""  # this offer's key on that stream


class PeerTransport(ABC):
    """One data path: moves offered blocks from a holder into this daemon's host slots."""

    name: ClassVar[str]

    @abstractmethod
    def read(self, offer: Offer, indexes: Sequence[int], slots: Sequence[Slot], deadline: float,
             arrived: Callable[[int], None] | None = None) -> None:
        """Copy the offered blocks ``indexes`` into ``slots`` (same length) by ``deadline``
        (``time.monotonic()``); raise :class:`PeerError` otherwise (see the module invariant).
        ``arrived(position)`` is called (on the caller's thread) as soon as ``slots[position]``
        holds its bytes, so the caller can check them while the rest is in flight; a position
        never reported has not arrived."""

    def usable_for(self, offer: Offer) -> bool:
        """Whether this transport can read ``offer`` (NIXL needs the holder's endpoint)."""
        return True

    def connect(self, offer: Offer) -> None:
        """Set up what reading from ``offer``'s holder needs, ahead of the first fetch (``offer``
        may be a hello: no blocks). Raises PeerError if the holder cannot be reached this way."""

    def close(self) -> None:
        """Release what the transport holds (connections, registrations)."""
