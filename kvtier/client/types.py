"""Results of daemon calls, as the client returns them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from kvtier.chain.stats import ChainStats
from kvtier.daemon.client_counters import ClientCounters
from kvtier.events.model import PublisherStatus


class ReserveStatus(Enum):
    RESERVED = "reserved"  # write the slot, then commit it
    ALREADY_PRESENT = "already_present"  # the daemon holds the block; nothing to write
    NO_SPACE = "no_space"  # host memory is full of pinned blocks; skip this block


@dataclass(frozen=True, slots=True)
class RegisteredLayout:
    layout_id: str
    block_nbytes: int
    arena_path: str
    arena_nbytes: int
    daemon_instance: str  # changes when the daemon restarts
    prefill_tokens_per_s: float = 0.0  # the latest rate a client of this layout reported (0: none)
    wants_block_descriptions: bool = False  # the daemon publishes vLLM KV events: describe saved blocks


class Reservation(NamedTuple):  # tuples: built per block, cheaply
    block_hash: bytes
    status: ReserveStatus
    offset: int  # arena offset of the slot (RESERVED only)
    nbytes: int
    reservation_id: int


class LeasedBlock(NamedTuple):
    block_hash: bytes
    offset: int
    nbytes: int
    checksum: int  # XXH3-64 recorded at commit; verify after copying out


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    lease_id: int
    blocks: tuple[LeasedBlock, ...]  # the leading run of requested blocks held in host memory
    expires_in_s: float


@dataclass(frozen=True, slots=True)
class FetchResult:
    host_blocks: int  # leading blocks in host memory when the daemon stopped waiting
    done: bool  # the promotion finished
    gave_up: bool  # the budget ended the wait first
    lease: LeaseGrant | None  # on those blocks (None when there are none)


@dataclass(frozen=True, slots=True)
class DaemonStats:
    chain: ChainStats
    active_reservations: int
    uptime_s: float
    node: str
    version: str
    publish: PublisherStatus | None = None  # None: the daemon runs no index publisher
    clients: tuple[ClientCounters, ...] = ()  # the latest counters each reporting client sent (the connector's)


class PendingCommit:
    """A commit sent to the daemon and not yet answered."""

    def __init__(self, wait: Callable[[], int]) -> None:
        self._wait = wait

    def result(self) -> int:
        """Wait for the daemon's answer (call once); return how many blocks it committed."""
        return self._wait()
