"""Commit a writer's slots in chunks while it fills the next ones.

A put costs a copy into the arena (in the writer's process), a checksum of the same bytes and a
commit call. Writers that checksum as they copy (the connector and ``write_blocks`` do: the bytes
are hot in their cache) send the checksums with the commit, which is then bookkeeping only; for
a writer that does not, the daemon reads the slots again to checksum them. Committed one chunk
at a time, as each chunk is filled, chunk k's commit overlaps the copy of chunk k+1, so a put
takes about the longer of the two instead of their sum.

Invariants:

- At most one commit is in flight, and chunks are committed in the order they were filled.
- Used as a context manager, every reservation handed to the pipeline ends committed or aborted:
  on a normal exit the rest is committed and waited for; on an exception the commit in flight is
  waited for and every reservation not yet sent for commit is aborted. A commit that fails
  changes nothing in the daemon (it checks a batch whole), so its chunk is aborted too. Only an
  unreachable daemon leaves reservations behind, and it reclaims them when they expire.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from kvtier.client.types import PendingCommit, Reservation, ReserveStatus
from kvtier.errors import DaemonUnavailableError, InvalidRequestError, KVTierError

if TYPE_CHECKING:
    from kvtier.client.client import DaemonClient

# Big enough that the calls cost little next to the copy (a 4 MiB copy takes about 0.3 ms here, a
# commit call tens of microseconds); small enough that the last chunk's checksum, which nothing
# overlaps, is a small part of a batch.
COMMIT_CHUNK_BYTES = 4 << 20


class CommitPipeline:
    def __init__(self, client: DaemonClient, reservations: Sequence[Reservation], chunk_nbytes: int = COMMIT_CHUNK_BYTES) -> None:
        self._client = client
        self._chunk_nbytes = chunk_nbytes
        self._unsent = {r.reservation_id: r for r in reservations if r.status is ReserveStatus.RESERVED}
        self._chunk: list[int] = []
        self._chunk_checksums: list[int] | None = []  # None once a slot came without one
        self._chunk_bytes = 0
        self._in_flight: tuple[PendingCommit, list[int]] | None = None
        self.committed = 0

    def filled(self, reservations: Iterable[Reservation], checksums: Iterable[int] | None = None) -> None:
        """These slots hold their bytes now; commit them with the current chunk once it is full.
        ``checksums``: their XXH3-64 as written, one per reservation (else the daemon computes them)."""
        reservations = list(reservations)
        sums = list(checksums) if checksums is not None else None
        if sums is not None and len(sums) != len(reservations):
            raise ValueError(f"{len(sums)} checksums for {len(reservations)} reservations")
        for reservation in reservations:
            if reservation.reservation_id not in self._unsent:
                raise ValueError(f"reservation {reservation.reservation_id} is not a pending reservation of this pipeline")
            self._chunk.append(reservation.reservation_id)
            self._chunk_bytes += reservation.nbytes
        if sums is None:
            self._chunk_checksums = None
        elif self._chunk_checksums is not None:
            self._chunk_checksums.extend(sums)
        if self._chunk_bytes >= self._chunk_nbytes:
            self._send_chunk()

    def finish(self) -> int:
        """Commit what was filled and wait for it, abort the reservations never filled; return how
        many blocks were committed."""
        self._send_chunk()
        self._wait()
        unfilled, self._unsent = list(self._unsent), {}
        self._abort_quietly(unfilled)
        return self.committed

    def abort(self) -> None:
        """Wait for the commit in flight (its error, if any, is the caller's error's consequence)
        and abort every reservation not sent for commit."""
        try:
            self._wait()
        except KVTierError:
            pass
        unsent, self._unsent = list(self._unsent), {}
        self._chunk, self._chunk_checksums, self._chunk_bytes = [], [], 0
        self._abort_quietly(unsent)

    def _abort_quietly(self, reservation_ids: list[int]) -> None:
        """Abort what is still reserved: one by one if the batch names an id that is not."""
        if not reservation_ids:
            return
        try:
            self._client.abort(reservation_ids)
        except InvalidRequestError:
            for reservation_id in reservation_ids:
                try:
                    self._client.abort([reservation_id])
                except InvalidRequestError:
                    pass
        except DaemonUnavailableError:
            pass  # the daemon reclaims them when they expire

    def _send_chunk(self) -> None:
        if not self._chunk:
            return
        self._wait()
        chunk, checksums = self._chunk, self._chunk_checksums
        self._chunk, self._chunk_checksums, self._chunk_bytes = [], [], 0
        for reservation_id in chunk:
            del self._unsent[reservation_id]
        self._in_flight = (self._client.commit_async(chunk, checksums), chunk)

    def _wait(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        pending, chunk = in_flight
        try:
            self.committed += pending.result()
        except InvalidRequestError:
            self._abort_quietly(chunk)
            raise

    def __enter__(self) -> CommitPipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()
