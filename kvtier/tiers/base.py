"""The tier interface: a few storage primitives per backend, batch helpers derived once here.

A tier stores opaque block payloads under :class:`BlockKey`. It has no policy: it never evicts
on its own; the tier chain (``kvtier.chain``) decides placement, eviction, demotion and promotion
and calls ``delete``. A tier refuses a ``put`` it has no room for with :class:`TierFullError`.

Contract every backend keeps (checked by ``tests/tiers/test_conformance.py``):

- Thread-safe: any method may be called from several threads at once.
- ``put`` is atomic: a reader, in this process or after a crash and restart, sees either no block
  or the whole block, never a part. Putting an existing key replaces it.
- ``get``/``read_into`` return ``None``/``False`` for an absent key. A tier that keeps a checksum
  (everything below the host tier) verifies it and raises :class:`CorruptBlockError` when the
  stored bytes are damaged; it does not delete them (the chain does, and counts it).
- Failures surface as kvtier errors only (``TierFullError``, ``DiskFullError``,
  ``TierUnavailableError``, ``CorruptBlockError``); foreign exceptions are translated.
- ``scan`` lists what the tier holds, so the chain can rebuild its catalogue after a restart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

from kvtier.blocks.keys import BlockKey
from kvtier.errors import CorruptBlockError, KVTierError

Buffer = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """One block a tier holds: its key and payload size (``checksum`` when cheaply known)."""

    key: BlockKey
    nbytes: int
    checksum: int | None = None


@dataclass(frozen=True, slots=True)
class PutRequest:
    key: BlockKey
    payload: Buffer
    checksum: int  # XXH3-64 of payload (kvtier.blocks.checksum.payload_checksum)


class Tier(ABC):
    """A storage backend. See the module docstring for the contract."""

    #: Registry name of the backend (``host``, ``disk``, ``s3``).
    kind: ClassVar[str]

    def __init__(self, name: str, capacity_bytes: int | None) -> None:
        self.name = name  # instance name used in stats and errors
        self.capacity_bytes = capacity_bytes  # None = unbounded (the chain never evicts for room)

    # ---- primitives -------------------------------------------------------------------------

    @abstractmethod
    def put(self, key: BlockKey, payload: Buffer, checksum: int) -> None:
        """Store ``payload`` under ``key`` atomically."""

    @abstractmethod
    def get(self, key: BlockKey) -> bytes | None:
        """Return a copy of the payload, or None when absent."""

    @abstractmethod
    def delete(self, key: BlockKey) -> bool:
        """Remove the block; return whether it was there."""

    @abstractmethod
    def contains(self, key: BlockKey) -> bool:
        """Whether the block is stored (no payload check)."""

    @abstractmethod
    def scan(self) -> Iterator[StoredBlock]:
        """Yield every block the tier holds (used to rebuild the catalogue at start)."""

    def close(self) -> None:
        """Release resources. The tier is unusable afterwards; stored data stays where durable."""

    # ---- derived helpers (backends may override for speed) -----------------------------------

    def stored_nbytes(self, payload_nbytes: int) -> int:
        """Bytes a payload of this size occupies against ``capacity_bytes``."""
        return payload_nbytes

    def read_into(self, key: BlockKey, out: memoryview) -> bool:
        """Copy the payload into ``out`` (exactly its size); False when absent.

        Raises CorruptBlockError when the stored size differs from ``len(out)``.
        """
        data = self.get(key)
        if data is None:
            return False
        if len(data) != len(out):
            raise CorruptBlockError(
                f"{key}: stored payload is {len(data)} bytes, expected {len(out)}", tier=self.name
            )
        out[:] = data
        return True

    def put_many(self, requests: Sequence[PutRequest]) -> list[KVTierError | None]:
        """Store several blocks; return per request None on success or the kvtier error."""
        results: list[KVTierError | None] = []
        for request in requests:
            try:
                self.put(request.key, request.payload, request.checksum)
                results.append(None)
            except KVTierError as exc:
                results.append(exc)
        return results

    def get_many(self, keys: Sequence[BlockKey]) -> list[bytes | KVTierError | None]:
        """Fetch several blocks; per key the payload, None when absent, or the kvtier error."""
        results: list[bytes | KVTierError | None] = []
        for key in keys:
            try:
                results.append(self.get(key))
            except KVTierError as exc:
                results.append(exc)
        return results

    def contains_many(self, keys: Iterable[BlockKey]) -> list[bool]:
        return [self.contains(key) for key in keys]

    def __enter__(self) -> Tier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, capacity_bytes={self.capacity_bytes})"
