"""The daemon's logic, free of gRPC: layouts, per-client reservations and leases, expiry.

The servicer (``kvtier.daemon.servicer``) converts wire messages to calls on :class:`DaemonCore`
and its errors to gRPC status codes; everything here speaks domain types and kvtier errors.

Invariants:

- A reservation or lease belongs to the client that made it; another client cannot commit,
  abort or release it.
- Every reservation and lease expires: a client that dies (or hangs) loses its slots after
  ``reservation_ttl_s`` / the lease TTL, reclaimed by :meth:`DaemonCore.reap`, so nothing leaks.
- A batch (commit, abort) is checked whole before anything is applied: an unknown id fails the
  call and changes nothing.
- Arena offsets are only handed to a client that mapped this daemon's arena: a reserve or acquire
  naming another ``daemon_instance`` (the client registered with a daemon that has since
  restarted) fails with :class:`LayoutError`, since its writes would land in a stale file.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

from kvtier.blocks.hashing import BLOCK_HASH_BYTES
from kvtier.blocks.keys import BlockKey, keys_for
from kvtier.blocks.layout import KVLayout
from kvtier.chain import ChainStats, NotReserved, TierChain
from kvtier.chain.promotion import FetchBudget
from kvtier.config import DaemonConfig
from kvtier.daemon.client_counters import ClientCounterBoard
from kvtier.errors import InvalidRequestError, LayoutError, LeaseError
from kvtier.events.vllm_out import BlockDescription, BlockDescriptions
from kvtier.tiers.host import Slot

if TYPE_CHECKING:
    from kvtier.transport.fetcher import Found, PeerFetcher


class ReserveStatus(Enum):
    RESERVED = 1
    ALREADY_PRESENT = 2
    NO_SPACE = 3


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    block_hash: bytes
    status: ReserveStatus
    slot: Slot | None = None


class LeasedSlot(NamedTuple):  # a tuple: cheap to build per block, and msgpack sends it as an array
    block_hash: bytes
    offset: int
    nbytes: int
    checksum: int


@dataclass(frozen=True, slots=True)
class AcquireOutcome:
    lease_id: int
    slots: tuple[LeasedSlot, ...]
    ttl_s: float


@dataclass(frozen=True, slots=True)
class PrefetchOutcome:
    host_blocks: int  # leading blocks in host memory when the call returned
    done: bool  # the promotion finished (nothing more will arrive)
    gave_up: bool  # stopped by the budget before it finished
    lease: AcquireOutcome | None  # on the leading host run, when asked for


@dataclass(slots=True)
class _Reservation:
    client_id: str
    slot: Slot
    expires_at: float


@dataclass(slots=True)
class _LeaseOwner:
    client_id: str
    expires_at: float


class DaemonCore:
    def __init__(self, chain: TierChain, config: DaemonConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.chain = chain
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._layouts: dict[str, KVLayout] = {}
        self._prefill_rates: dict[str, float] = {}  # layout id -> tokens/s a client measured (advisory)
        self._reservations: dict[int, _Reservation] = {}
        self._leases: dict[int, _LeaseOwner] = {}
        self.started_at = time.time()
        self.instance = uuid.uuid4().hex  # new on every start: clients re-map the arena when it changes
        self.on_new_layout: Callable[[KVLayout], None] | None = None  # the index publisher listens
        self.descriptions: BlockDescriptions | None = None  # set when the daemon publishes vLLM KV events
        self.client_counters = ClientCounterBoard()  # what clients count on their side (Stats shows it)
        self.peers: PeerFetcher | None = None  # set when the daemon pulls from other nodes (docs/peer.md)

    # ---- layouts -----------------------------------------------------------------------------

    def register_layout(self, layout: KVLayout, expected_layout_id: str = "", *, prefill_tokens_per_s: float = 0.0) -> KVLayout:
        """Register (again: idempotent) a layout; a positive ``prefill_tokens_per_s`` is what the
        client measured of its engine, kept for the next client (:meth:`prefill_rate`)."""
        if not 0 <= prefill_tokens_per_s < 1e12:
            raise InvalidRequestError(f"prefill_tokens_per_s must be a non-negative rate, got {prefill_tokens_per_s}")
        if expected_layout_id and expected_layout_id != layout.layout_id:
            raise LayoutError(
                f"client computed layout id {expected_layout_id}, daemon computes {layout.layout_id} for the "
                "same descriptor: client and daemon run different kvtier versions; upgrade one of them"
            )
        with self._lock:
            new = layout.layout_id not in self._layouts
            self._layouts.setdefault(layout.layout_id, layout)
            if prefill_tokens_per_s > 0:
                self._prefill_rates[layout.layout_id] = prefill_tokens_per_s
        if new and self.on_new_layout is not None:
            self.on_new_layout(layout)
        return layout

    def describe_blocks(self, described: Sequence[tuple[bytes, bytes | None, Sequence[int], str | None]]) -> None:
        """Keep the token ids clients report for their blocks (``(hash, parent, tokens, lora)``),
        for the vLLM KV events; ignored when the daemon publishes none."""
        if self.descriptions is None:
            return
        if len(described) > self.config.max_blocks_per_request:
            raise InvalidRequestError(f"{len(described)} blocks in one request; the limit is {self.config.max_blocks_per_request}")
        checked = []
        for block_hash, parent, tokens, lora in described:
            if len(block_hash) != BLOCK_HASH_BYTES or (parent is not None and len(parent) != BLOCK_HASH_BYTES):
                raise InvalidRequestError(f"block and parent hashes must be {BLOCK_HASH_BYTES} bytes")
            checked.append((bytes(block_hash), BlockDescription(bytes(parent) if parent else None, tuple(tokens), lora or None)))
        self.descriptions.add(checked)

    def layouts(self) -> list[KVLayout]:
        with self._lock:
            return list(self._layouts.values())

    def prefill_rate(self, layout_id: str) -> float:
        """The latest prefill rate (tokens/s) a client reported for ``layout_id``; 0 if none."""
        with self._lock:
            return self._prefill_rates.get(layout_id, 0.0)

    def layout(self, layout_id: str) -> KVLayout:
        with self._lock:
            layout = self._layouts.get(layout_id)
        if layout is None:
            raise LayoutError(f"layout {layout_id!r} is not registered with this daemon; call RegisterLayout first")
        return layout

    def _keys(self, layout_id: str, block_hashes: Sequence[bytes]) -> list[BlockKey]:
        self.layout(layout_id)
        if len(block_hashes) > self.config.max_blocks_per_request:
            raise InvalidRequestError(
                f"{len(block_hashes)} blocks in one request; the limit is {self.config.max_blocks_per_request}"
            )
        return keys_for(layout_id, block_hashes)

    # ---- lookups and prefetch ----------------------------------------------------------------

    def lookup(self, layout_id: str, block_hashes: Sequence[bytes], refresh: bool = False) -> list[str]:
        """Tier names of the longest run held here, then ``"peer"`` for the blocks after it that
        another node holds (a prefetch pulls them); blocks another node wrote to the shared S3
        bucket answer ``"s3"``."""
        keys = self._keys(layout_id, block_hashes)
        remote = self._find_remote(layout_id, keys)
        tiers = self.chain.lookup(keys, refresh)
        if remote is not None and len(tiers) == remote[0]:
            tiers += ["peer"] * remote[1].peer_blocks
        return tiers

    def _find_remote(self, layout_id: str, keys: list[BlockKey]) -> tuple[int, Found] | None:
        """What other nodes hold after the local run: (where the peer run starts, what was found),
        or None when nothing is missing here or the daemon has no peers."""
        if self.peers is None:
            return None
        local = len(self.chain.lookup(keys))
        if local == len(keys):
            return None
        found = self.peers.find(self.layout(layout_id), keys[local:])
        return local + found.shared, found

    def prefetch(self, layout_id: str, block_hashes: Sequence[bytes], wait_s: float, *, budget: FetchBudget | None = None,
                 lease_for: str | None = None, lease_ttl_s: float = 0, daemon_instance: str = "",
                 from_peers: bool = True) -> PrefetchOutcome:
        """Start promoting and wait up to ``wait_s`` for it to finish, or less under ``budget``
        (a waiting request's loss budget: see :class:`FetchBudget`). With ``lease_for`` (a client
        id), lease the leading run that is in host memory when the wait ends, in the same call.
        Blocks after the local run that a peer holds are pulled too, unless ``from_peers`` is
        False (a peer's own offer: holders never chain fetches)."""
        keys = self._keys(layout_id, block_hashes)
        if lease_for is not None:
            self.check_client_id(lease_for)
            self.check_instance(daemon_instance)
        remote = self._find_remote(layout_id, keys) if from_peers else None
        promotion = self.chain.prefetch(keys)
        if remote is not None and remote[1].peer_blocks and promotion.count == remote[0]:
            first = promotion.extend(remote[1].peer_blocks)
            self.peers.fetch(self.layout(layout_id), keys[first:promotion.count], remote[1].peer, promotion, first)

        def remaining_s(elapsed_s: float, got: int) -> float:
            left = wait_s - elapsed_s
            return left if budget is None else min(left, budget.remaining_s(elapsed_s, got))

        finished = promotion.wait(remaining_s) if wait_s > 0 else promotion.finished
        host_blocks = 0
        for tier in self.chain.lookup(keys):
            if tier != self.chain.host.name:
                break
            host_blocks += 1
        lease = None
        if lease_for is not None and host_blocks:
            lease = self.acquire(lease_for, layout_id, block_hashes[:host_blocks], lease_ttl_s, daemon_instance=daemon_instance)
        return PrefetchOutcome(host_blocks, promotion.finished, not finished and budget is not None, lease)

    # ---- writes ------------------------------------------------------------------------------

    def check_instance(self, daemon_instance: str) -> None:
        """Refuse a client whose arena mapping belongs to an earlier run of the daemon (empty: unchecked)."""
        if daemon_instance and daemon_instance != self.instance:
            raise LayoutError(
                "the daemon restarted since this client registered (its arena is a new file): "
                "register the layout again and map the new arena"
            )

    def reserve(self, client_id: str, layout_id: str, block_hashes: Sequence[bytes], block_nbytes: int = 0,
                *, daemon_instance: str = "") -> list[ReserveOutcome]:
        self.check_client_id(client_id)
        self.check_instance(daemon_instance)
        layout = self.layout(layout_id)
        if block_nbytes and block_nbytes != layout.block_nbytes:
            raise InvalidRequestError(
                f"block size {block_nbytes} does not match layout {layout_id} ({layout.block_nbytes} bytes per block)"
            )
        outcomes: list[ReserveOutcome] = []
        expires_at = self._clock() + self.config.reservation_ttl_s
        keys = self._keys(layout_id, block_hashes)
        results = self.chain.reserve_absent(keys, layout.block_nbytes)
        with self._lock:
            for key, result in zip(keys, results):
                if result is NotReserved.PRESENT:
                    outcomes.append(ReserveOutcome(key.block_hash, ReserveStatus.ALREADY_PRESENT))
                elif result is NotReserved.NO_SPACE:
                    outcomes.append(ReserveOutcome(key.block_hash, ReserveStatus.NO_SPACE))
                else:
                    self._reservations[result.reservation] = _Reservation(client_id, result, expires_at)
                    outcomes.append(ReserveOutcome(key.block_hash, ReserveStatus.RESERVED, result))
        return outcomes

    def _take_reservations(self, client_id: str, reservation_ids: Sequence[int]) -> list[Slot]:
        with self._lock:
            unknown = [r for r in reservation_ids if r not in self._reservations or self._reservations[r].client_id != client_id]
            if unknown:
                raise InvalidRequestError(
                    f"reservations {unknown[:8]} are unknown to client {client_id!r}: never made, already "
                    "committed or aborted, or expired"
                )
            if len(set(reservation_ids)) != len(reservation_ids):
                raise InvalidRequestError("a reservation id appears twice in one request")
            return [self._reservations.pop(r).slot for r in reservation_ids]

    def commit(self, client_id: str, reservation_ids: Sequence[int], checksums: Sequence[int] | None = None) -> int:
        """Make reserved slots visible. ``checksums`` (one per id) are the writer's XXH3-64 of the
        bytes it wrote; without them the daemon computes them here, on the caller's time."""
        self.check_client_id(client_id)
        if checksums is not None and (len(checksums) != len(reservation_ids)
                                      or not all(0 <= c < 1 << 64 for c in checksums)):
            raise InvalidRequestError(f"{len(checksums)} checksums for {len(reservation_ids)} reservations; give one "
                                      "unsigned 64-bit checksum per reservation, or none")
        slots = self._take_reservations(client_id, reservation_ids)
        for slot, checksum in zip(slots, checksums or [None] * len(slots)):
            self.chain.commit(slot, checksum)
        return len(reservation_ids)

    def abort(self, client_id: str, reservation_ids: Sequence[int]) -> int:
        self.check_client_id(client_id)
        for slot in self._take_reservations(client_id, reservation_ids):
            self.chain.abort(slot)
        return len(reservation_ids)

    # ---- reads -------------------------------------------------------------------------------

    def acquire(self, client_id: str, layout_id: str, block_hashes: Sequence[bytes], ttl_s: float = 0,
                *, daemon_instance: str = "") -> AcquireOutcome:
        self.check_client_id(client_id)
        self.check_instance(daemon_instance)
        keys = self._keys(layout_id, block_hashes)
        ttl_s = ttl_s or self.chain.config.lease_ttl_s
        lease = self.chain.acquire(keys, ttl_s)
        slots = tuple([LeasedSlot(key.block_hash, slot.offset, slot.nbytes, checksum)
                       for key, (slot, checksum) in zip(lease.keys, lease.locations)])
        with self._lock:
            self._leases[lease.lease_id] = _LeaseOwner(client_id, self._clock() + ttl_s)
        return AcquireOutcome(lease.lease_id, slots, ttl_s)

    def release(self, client_id: str, lease_id: int) -> None:
        self.check_client_id(client_id)
        with self._lock:
            owner = self._leases.get(lease_id)
            if owner is None or owner.client_id != client_id:
                raise LeaseError(f"lease {lease_id} is unknown to client {client_id!r}: already released or expired")
            del self._leases[lease_id]
        self.chain.release(lease_id)

    def holds_lease(self, client_id: str, lease_id: int) -> bool:
        """Whether ``lease_id`` is live and belongs to ``client_id`` (its blocks are still pinned)."""
        with self._lock:
            owner = self._leases.get(lease_id)
            return owner is not None and owner.client_id == client_id and owner.expires_at > self._clock()

    # ---- clients and expiry ------------------------------------------------------------------

    def disconnect(self, client_id: str) -> tuple[int, int]:
        """Release every lease and abort every reservation of ``client_id``."""
        with self._lock:
            leases = [i for i, owner in self._leases.items() if owner.client_id == client_id]
            reservations = [i for i, r in self._reservations.items() if r.client_id == client_id]
        for lease_id in leases:
            self._drop_lease(lease_id)
        for reservation_id in reservations:
            self._drop_reservation(reservation_id)
        return len(leases), len(reservations)

    def reap(self) -> None:
        """Reclaim expired reservations and leases (called periodically by the server)."""
        now = self._clock()
        with self._lock:
            leases = [i for i, owner in self._leases.items() if owner.expires_at <= now]
            reservations = [i for i, r in self._reservations.items() if r.expires_at <= now]
        for lease_id in leases:
            self._drop_lease(lease_id)
        for reservation_id in reservations:
            self._drop_reservation(reservation_id)
        self.chain.expire_leases()

    def _drop_lease(self, lease_id: int) -> None:
        with self._lock:
            if self._leases.pop(lease_id, None) is None:
                return
        try:
            self.chain.release(lease_id)
        except LeaseError:
            pass  # the chain expired it on its own clock already

    def _drop_reservation(self, reservation_id: int) -> None:
        with self._lock:
            reservation = self._reservations.pop(reservation_id, None)
        if reservation is not None:
            self.chain.abort(reservation.slot)

    @staticmethod
    def check_client_id(client_id: str) -> None:
        if not isinstance(client_id, str) or not client_id or len(client_id) > 256:
            raise InvalidRequestError("client_id must be a non-empty string of at most 256 characters")

    # ---- stats -------------------------------------------------------------------------------

    def report_counters(self, client_id: str, role: str, counters: dict[str, int], failures: dict[str, int]) -> None:
        self.check_client_id(client_id)
        self.client_counters.report(client_id, role, counters, failures)

    def stats(self) -> tuple[ChainStats, int]:
        """The chain's tiers, plus a ``peer`` row when the daemon pulls from other nodes."""
        with self._lock:
            reservations = len(self._reservations)
        stats = self.chain.stats()
        if self.peers is not None:
            stats = dataclasses.replace(stats, tiers=(*stats.tiers, self.peers.stats()))
        return stats, reservations
