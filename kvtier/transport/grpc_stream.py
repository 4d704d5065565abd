"""The TCP data path: the holder streams the offered blocks over gRPC (``KVTierPeer.Read``).

For peers without NIXL (or when ``peer.transport`` is ``tcp``). Chunks are written into the
target slots as they arrive; a stream that ends early, sends a chunk out of place or passes the
deadline is cancelled and raises, and the caller aborts the slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import grpc

from kvtier.transport.base import Offer, PeerError, PeerTransport

if TYPE_CHECKING:
    from kvtier.tiers.host import HostTier, Slot
    from kvtier.transport.channel import PeerChannel


class GrpcStreamTransport(PeerTransport):
    name: ClassVar[str] = "tcp"

    def __init__(self, host: HostTier, *, puller: str, chunk_bytes: int) -> None:
        self._host = host
        self._puller = puller
        self._chunk_bytes = chunk_bytes

    def read(self, channel: PeerChannel, offer: Offer, indexes: Sequence[int], slots: Sequence[Slot], deadline: float,
             arrived: Callable[[int], None] | None = None) -> None:
        start = 0
        while start < len(indexes):  # one stream per consecutive run of the offer's blocks
            end = start + 1
            while end < len(indexes) and indexes[end] == indexes[end - 1] + 1:
                end += 1
            run_start = start
            self._read_run(channel, offer, indexes[start], slots[start:end], deadline,
                           None if arrived is None else lambda position: arrived(run_start + position))
            start = end

    def _read_run(self, channel: PeerChannel, offer: Offer, first: int, slots: Sequence[Slot], deadline: float,
                  arrived: Callable[[int], None] | None) -> None:
        timeout_s = deadline - time.monotonic()
        if timeout_s <= 0:
            raise PeerError(f"peer {offer.peer}: no time left for the transfer", peer=offer.peer, reason="timeout")
        targets = [self._host.slot_view(slot) for slot in slots]
        filled = [0] * len(slots)
        stream = channel.read(offer, first, len(slots), puller=self._puller, chunk_bytes=self._chunk_bytes, timeout_s=timeout_s)
        try:
            for chunk in stream:
                position = chunk.index - first
                if not 0 <= position < len(targets) or chunk.start != filled[position]:
                    raise PeerError(f"peer {offer.peer} sent a chunk out of place (block {chunk.index}, byte {chunk.start})",
                                    peer=offer.peer, reason="invalid")
                end = chunk.start + len(chunk.data)
                if end > len(targets[position]):
                    raise PeerError(f"peer {offer.peer} sent more bytes than block {chunk.index} holds", peer=offer.peer,
                                    reason="invalid")
                targets[position][chunk.start:end] = chunk.data
                filled[position] = end
                if end == len(targets[position]) and arrived is not None:
                    arrived(position)
        except grpc.RpcError as exc:
            raise channel.read_error(exc) from None
        finally:
            stream.cancel()  # no-op once finished; stops the holder's stream on an early exit
        short = [first + i for i, (n, view) in enumerate(zip(filled, targets)) if n != len(view)]
        if short:
            raise PeerError(f"peer {offer.peer} ended the stream with blocks {short[:4]} incomplete", peer=offer.peer,
                            reason="invalid")
