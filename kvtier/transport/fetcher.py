"""Pulling blocks other nodes hold into this daemon's host memory (docs/peer.md).

:meth:`PeerFetcher.find` runs on a lookup: it asks the index (through the
:class:`BlockDirectory`, under a short deadline) who holds the blocks after the local run. Blocks
the index places in this daemon's own shared S3 bucket are adopted into the chain's S3
catalogue (another node wrote them after this daemon started), and become ordinary S3 reads.
After them, the peer (not backed off, with a known address) holding the longest run in its host
or disk tier is named. :meth:`PeerFetcher.fetch` then pulls that run on a fetch thread while
the request waits asynchronously, settling each block into the caller's :class:`Promotion`.

Invariants:

- Nothing a peer sends is visible before it is checked: bytes land in reserved (invisible) host
  slots; a block is committed only if the offer names the hash asked for at that position, the
  layout's block size, and the bytes match the offered XXH3-64. Anything else aborts the slot
  and counts (``corrupt`` for bad bytes, ``invalid`` for a wrong offer): a miss, then a recompute.
- Every fetch ends by ``peer.timeout_s``: a dead or slow peer costs at most that, on a fetch
  thread, never on a lookup or the engine's step. Its offer is released (best effort; the
  holder's lease expires anyway).
- A peer whose fetch failed is skipped for ``backoff_s``, doubling per consecutive failure up to
  ``max_backoff_s``; a success resets it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kvtier.blocks.checksum import payload_checksum
from kvtier.blocks.keys import BlockKey
from kvtier.blocks.layout import KVLayout
from kvtier.chain import NotReserved, TierChain
from kvtier.chain.promotion import Promotion
from kvtier.chain.stats import TierCounters, TierStats
from kvtier.config import PeerConfig
from kvtier.events.model import IndexTier
from kvtier.tiers.host import Slot
from kvtier.transport.base import Offer, PeerError, PeerTransport
from kvtier.transport.channel import PeerChannel, PeerCredentials
from kvtier.transport.directory import BlockDirectory, close_directory

log = logging.getLogger(__name__)

PEER_TIERS = frozenset({IndexTier.HOST, IndexTier.DISK})
_LEASE_MARGIN_S = 5.0


@dataclass(frozen=True, slots=True)
class Found:
    """What other nodes hold after a local run: ``shared`` leading blocks in this daemon's own
    S3 bucket (adopted into its catalogue), then ``peer_blocks`` on ``peer``."""

    shared: int = 0
    peer: str | None = None
    peer_blocks: int = 0


@dataclass(slots=True)
class _Backoff:
    failures: int = 0
    until: float = 0.0


class PeerFetcher:
    def __init__(self, chain: TierChain, directory: BlockDirectory, config: PeerConfig, *, node: str,
                 transports: Sequence[PeerTransport], credentials: PeerCredentials,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if config.enabled and not transports:
            raise ValueError("a peer fetcher that pulls from peers needs at least one transport")
        self.chain = chain
        self.directory = directory
        self.config = config
        self.node = node
        self.transports = list(transports)  # in order of preference
        self.credentials = credentials
        self._clock = clock
        self._lock = threading.Lock()
        self._channels: dict[tuple[str, str], PeerChannel] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._fallback_logged: set[str] = set()
        self._warmed: set[tuple[str, str]] = set()
        self._pool = ThreadPoolExecutor(config.fetch_threads, thread_name_prefix="kvtier-peer")
        self._releaser = ThreadPoolExecutor(1, thread_name_prefix="kvtier-peer-release")
        self._checkers = ThreadPoolExecutor(2, thread_name_prefix="kvtier-peer-check")
        self._warmer = ThreadPoolExecutor(1, thread_name_prefix="kvtier-peer-warm")
        self.counters = TierCounters()  # hits: blocks fetched; misses: blocks asked and not brought in
        self.failures: Counter[str] = Counter()  # failed fetches by reason
        self.shared_adopted = 0
        self.by_transport: Counter[str] = Counter()

    # ---- finding -----------------------------------------------------------------------------

    def find(self, layout: KVLayout, keys: Sequence[BlockKey]) -> Found:
        """Who holds ``keys`` (the blocks after the local run), asked of the index once."""
        holdings = self.directory.holdings(layout, [key.block_hash for key in keys])
        if not holdings:
            return Found()
        shared = 0
        for holders in holdings:  # our own bucket: the index lists this node among its readers
            if not any(h.tier is IndexTier.S3 and h.node == self.node for h in holders):
                break
            shared += 1
        if shared:
            adopted = self.chain.adopt_shared("s3", keys[:shared], layout.block_nbytes)
            with self._lock:
                self.shared_adopted += adopted
        if not self.config.enabled:
            return Found(shared)
        now = self._clock()
        candidates: set[str] | None = None
        run = 0
        for holders in holdings[shared:self.config.max_blocks_per_fetch + shared]:
            nodes = {h.node for h in holders if h.tier in PEER_TIERS and h.node != self.node and not self._backed_off(h.node, now)}
            candidates = nodes if candidates is None else candidates & nodes
            if not candidates:
                break
            run += 1
        if not run or not candidates:
            return Found(shared)
        for peer in sorted(candidates):
            if self.directory.address_of(peer):
                return Found(shared, peer, run)
        return Found(shared)

    def _backed_off(self, peer: str, now: float) -> bool:
        with self._lock:
            state = self._backoff.get(peer)
            return state is not None and state.until > now

    # ---- fetching ----------------------------------------------------------------------------

    def fetch(self, layout: KVLayout, keys: Sequence[BlockKey], peer: str, promotion: Promotion, first: int) -> None:
        """Pull ``keys`` from ``peer`` in the background; block ``i`` settles ``promotion[first + i]``."""
        try:
            self._pool.submit(self._fetch, layout, list(keys), peer, promotion, first)
        except RuntimeError:  # shutting down
            for i in range(len(keys)):
                promotion.settle(first + i, False)

    def warm_up(self) -> None:
        """Connect to every live peer not yet connected, in the background: the gRPC channel, and
        NIXL's connection through a hello offer. A request's first fetch from a peer then does
        not pay the set-up (measured: 26-33 ms for the first pull against 12-22 ms after)."""
        if not self.config.enabled:
            return
        for peer, address in self.directory.peers().items():
            if peer == self.node:
                continue
            with self._lock:
                if (peer, address) in self._warmed:
                    continue
                self._warmed.add((peer, address))
            try:
                self._warmer.submit(self._warm, peer)
            except RuntimeError:  # closing
                return

    def _warm(self, peer: str) -> None:
        try:
            channel = self._channel(peer)
            hello = channel.offer("", [], puller=self.node, wait_s=0, ttl_s=1, want_nixl=any(t.name == "nixl" for t in self.transports),
                                  timeout_s=self.config.timeout_s)
            for transport in self.transports:
                if transport.usable_for(hello):
                    transport.connect(hello)
        except PeerError as exc:
            log.debug("warming up the connection to peer %s failed: %s", peer, exc)

    def _channel(self, peer: str) -> PeerChannel:
        address = self.directory.address_of(peer)
        if not address:
            raise PeerError(f"peer {peer} advertises no address (its daemon has no tcp_address)", peer=peer, reason="unreachable")
        with self._lock:
            channel = self._channels.get((peer, address))
            if channel is None:
                channel = self._channels[(peer, address)] = PeerChannel(peer, address, self.credentials)
            return channel

    def _transport_for(self, offer: Offer) -> PeerTransport:
        for transport in self.transports:
            if transport.usable_for(offer):
                if transport is not self.transports[0] and offer.peer not in self._fallback_logged:
                    self._fallback_logged.add(offer.peer)
                    log.warning("peer %s offers no %s endpoint; pulling from it over %s", offer.peer, self.transports[0].name,
                                transport.name)
                return transport
        raise PeerError(f"peer {offer.peer} offers no data path this daemon uses ({', '.join(t.name for t in self.transports)})",
                        peer=offer.peer, reason="unsupported")

    def _fetch(self, layout: KVLayout, keys: list[BlockKey], peer: str, promotion: Promotion, first: int) -> None:
        settled = [False] * len(keys)
        reserved: dict[int, Slot] = {}
        started = self._clock()
        deadline = started + self.config.timeout_s
        try:
            channel = self._channel(peer)
            offer = channel.offer(layout.layout_id, [key.block_hash for key in keys], puller=self.node,
                                  wait_s=self.config.holder_wait_s, ttl_s=self.config.timeout_s + _LEASE_MARGIN_S,
                                  want_nixl=any(t.name == "nixl" for t in self.transports), timeout_s=self.config.timeout_s)
            offered = self._clock()
            try:
                count = self._check_offer(offer, keys, layout)
                if count:
                    transport = self._transport_for(offer)
                    self._pull(transport, offer, keys[:count], layout, reserved, settled, promotion, first, deadline)
                    with self._lock:
                        self.by_transport[transport.name] += 1
                    log.debug("fetched %d of %d blocks from %s over %s in %.1f ms (offer %.1f ms)", sum(settled), len(keys), peer,
                              transport.name, (self._clock() - started) * 1000, (offered - started) * 1000)
            finally:
                if offer.lease_id:  # off this thread: the blocks are committed, the request need not wait
                    try:
                        self._releaser.submit(self._release, channel, offer)
                    except RuntimeError:  # closing: the holder's lease expires on its own
                        pass
            self._succeeded(peer)
        except PeerError as exc:
            self._failed(peer, exc)
        except Exception as exc:  # a bug must not leave a request waiting or a slot reserved
            log.exception("fetching from peer %s failed", peer)
            self._failed(peer, PeerError(str(exc), peer=peer))
        finally:
            for slot in reserved.values():
                self.chain.abort(slot)
            fetched = sum(settled)
            with self._lock:
                self.counters.hits += fetched
                self.counters.misses += len(keys) - fetched
            for i, ok in enumerate(settled):
                if not ok:
                    promotion.settle(first + i, False)

    def _check_offer(self, offer: Offer, keys: list[BlockKey], layout: KVLayout) -> int:
        """How many leading blocks the offer validly covers; PeerError if it lies about any."""
        if len(offer.blocks) > len(keys):
            raise PeerError(f"peer {offer.peer} offered {len(offer.blocks)} blocks for {len(keys)} asked", peer=offer.peer,
                            reason="invalid")
        for block, key in zip(offer.blocks, keys):
            if block.block_hash != key.block_hash or block.nbytes != layout.block_nbytes:
                raise PeerError(f"peer {offer.peer} offered block {block.block_hash.hex()} of {block.nbytes} bytes where "
                                f"{key.block_hash.hex()} of {layout.block_nbytes} bytes (layout {layout.layout_id}) was asked",
                                peer=offer.peer, reason="invalid")
        return len(offer.blocks)

    def _pull(self, transport: PeerTransport, offer: Offer, keys: list[BlockKey], layout: KVLayout,
              reserved: dict[int, Slot], settled: list[bool], promotion: Promotion, first: int, deadline: float) -> None:
        results = self.chain.reserve_absent(keys, layout.block_nbytes)
        reserved.update((i, result) for i, result in enumerate(results) if isinstance(result, Slot))
        indexes: list[int] = []
        stop = next((i for i, r in enumerate(results) if r is NotReserved.NO_SPACE), len(results))
        for i, result in enumerate(results[:stop]):
            if result is NotReserved.PRESENT:
                settled[i] = True  # a local writer or promotion brought it meanwhile
                promotion.settle(first + i, True)
            else:
                indexes.append(i)
        if not indexes:
            return
        slots = {i: reserved[i] for i in indexes}
        checks: dict[int, Future[bool]] = {}

        def check(i: int) -> bool:
            """Commit block ``i`` if its bytes match the offer (XXH3 releases the GIL: this runs
            on a checker thread while the transport brings the next blocks in)."""
            slot, expected = slots[i], offer.blocks[i].checksum
            if payload_checksum(self.chain.host.slot_view(slot)) != expected:
                return False  # aborted with the rest in _fetch
            del reserved[i]
            self.chain.commit(slot, expected)
            settled[i] = True
            promotion.settle(first + i, True)
            return True

        def arrived(position: int) -> None:
            checks[position] = self._checkers.submit(check, indexes[position])

        try:
            transport.read(offer, indexes, [slots[i] for i in indexes], deadline, arrived)
            for position in range(len(indexes)):
                if position not in checks:
                    arrived(position)
        finally:
            done = [future.result() for future in checks.values()]  # before _fetch aborts what is left
            corrupt = done.count(False)
            with self._lock:
                self.counters.corrupt += corrupt
                self.counters.bytes_in += done.count(True) * layout.block_nbytes
        if corrupt:
            raise PeerError(f"peer {offer.peer} sent {corrupt} blocks whose bytes do not match their checksums", peer=offer.peer,
                            reason="corrupt")

    def _release(self, channel: PeerChannel, offer: Offer) -> None:
        try:
            channel.release(offer, puller=self.node, timeout_s=1.0)
        except PeerError as exc:
            log.debug("releasing offer %d of %s failed (its lease expires on its own): %s", offer.lease_id, offer.peer, exc)

    def _succeeded(self, peer: str) -> None:
        with self._lock:
            self._backoff.pop(peer, None)

    def _failed(self, peer: str, exc: PeerError) -> None:
        now = self._clock()
        with self._lock:
            self.failures[exc.reason] += 1
            self.counters.errors += 1
            state = self._backoff.setdefault(peer, _Backoff())
            state.failures += 1
            pause = min(self.config.backoff_s * 2 ** (state.failures - 1), self.config.max_backoff_s)
            state.until = now + pause
        log.warning("peer fetch from %s failed (%s): %s; skipping it for %.1fs", peer, exc.reason, exc, pause)

    # ---- stats and lifecycle -----------------------------------------------------------------

    def counts(self) -> tuple[dict[str, int], dict[str, int], int]:
        """(fetches by data path, failed fetches by reason, shared blocks adopted), for metrics."""
        with self._lock:
            return dict(self.by_transport), dict(self.failures), self.shared_adopted

    def stats(self) -> TierStats:
        """The peer tier as ``kvtier stats`` shows it: hits are blocks fetched, misses blocks not."""
        with self._lock:
            counters = TierCounters(**{f: getattr(self.counters, f) for f in TierCounters.__slots__})
        return TierStats(name="peer", kind="peer", capacity_bytes=None, used_bytes=0, blocks=0, counters=counters)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._releaser.shutdown(wait=True)  # offers go back before the channels close
        self._checkers.shutdown(wait=True)
        self._warmer.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
        for transport in self.transports:
            transport.close()
        close_directory(self.directory)
