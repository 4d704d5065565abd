"""The commit pipeline: slots committed chunk by chunk as they are filled, one commit in flight;
on success every filled slot is committed, on an error the rest is aborted and nothing leaks."""

from __future__ import annotations

import pytest

from kvtier.blocks import hash_prompt
from kvtier.client import ReserveStatus
from kvtier.errors import InvalidRequestError
from tests.daemon.conftest import LAYOUT, DaemonProcess, payload

TRANSPORTS = pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "grpc"])


@TRANSPORTS
def test_filled_slots_are_committed_in_chunks_and_read_back(daemon: DaemonProcess, fast_path: bool) -> None:
    hashes = hash_prompt(list(range(16 * 40)), 16)
    with daemon.client(fast_path=fast_path) as client:
        reg = client.register_layout(LAYOUT)
        arena = client.arena()
        reservations = client.reserve(reg.layout_id, hashes)
        chunk_nbytes = 3 * LAYOUT.block_nbytes
        with client.commit_pipeline(reservations, chunk_nbytes=chunk_nbytes) as pipeline:
            for i, reservation in enumerate(reservations):
                arena.view(reservation.offset, reservation.nbytes)[:] = payload(reservation.block_hash)
                pipeline.filled([reservation])
                # A chunk is sent when full: every block of the chunks before the current one is
                # visible once the next chunk has been sent (one commit in flight at a time).
                if i % 3 == 2 and i >= 5:
                    assert client.lookup(reg.layout_id, hashes)[: i - 2] == ["host"] * (i - 2)
        assert pipeline.committed == len(hashes)
        assert client.stats().active_reservations == 0
        assert client.read_blocks(reg.layout_id, hashes) == [payload(h) for h in hashes]


@TRANSPORTS
def test_slots_left_unfilled_are_aborted_when_the_pipeline_finishes(daemon: DaemonProcess, fast_path: bool) -> None:
    """A copy cut short (a preempted request's blocks) fills some slots only: the rest go back now."""
    hashes = hash_prompt(list(range(16 * 6)), 16)
    with daemon.client(fast_path=fast_path) as client:
        reg = client.register_layout(LAYOUT)
        arena = client.arena()
        reservations = client.reserve(reg.layout_id, hashes)
        with client.commit_pipeline(reservations) as pipeline:
            for reservation in reservations[:2]:
                arena.view(reservation.offset, reservation.nbytes)[:] = payload(reservation.block_hash)
                pipeline.filled([reservation])
        assert pipeline.committed == 2 and client.stats().active_reservations == 0
        assert client.lookup(reg.layout_id, hashes) == ["host"] * 2


@TRANSPORTS
def test_an_error_while_filling_commits_what_was_sent_and_aborts_the_rest(daemon: DaemonProcess, fast_path: bool) -> None:
    hashes = hash_prompt(list(range(16 * 20)), 16)
    with daemon.client(fast_path=fast_path) as client:
        reg = client.register_layout(LAYOUT)
        arena = client.arena()
        reservations = client.reserve(reg.layout_id, hashes)
        with pytest.raises(RuntimeError, match="copy failed"), \
                client.commit_pipeline(reservations, chunk_nbytes=4 * LAYOUT.block_nbytes) as pipeline:
            for i, reservation in enumerate(reservations):
                if i == 10:
                    raise RuntimeError("copy failed")
                arena.view(reservation.offset, reservation.nbytes)[:] = payload(reservation.block_hash)
                pipeline.filled([reservation])
        # Blocks 0-7 went out in two full chunks; 8 and 9 were filled but not sent; 10-19 never filled.
        assert pipeline.committed == 8
        assert client.stats().active_reservations == 0
        assert client.lookup(reg.layout_id, hashes) == ["host"] * 8
        assert client.read_blocks(reg.layout_id, hashes) == [payload(h) for h in hashes[:8]]
        again = client.reserve(reg.layout_id, hashes)
        assert [r.status for r in again] == [ReserveStatus.ALREADY_PRESENT] * 8 + [ReserveStatus.RESERVED] * 12
        client.abort([r.reservation_id for r in again[8:]])


@TRANSPORTS
def test_a_failed_commit_is_raised_and_the_rest_aborted(daemon: DaemonProcess, fast_path: bool) -> None:
    hashes = hash_prompt(list(range(16 * 6)), 16)
    with daemon.client(fast_path=fast_path) as client:
        reg = client.register_layout(LAYOUT)
        reservations = client.reserve(reg.layout_id, hashes)
        client.abort([reservations[1].reservation_id])  # its commit will name an unknown reservation
        with pytest.raises(InvalidRequestError, match="unknown"), \
                client.commit_pipeline(reservations, chunk_nbytes=2 * LAYOUT.block_nbytes) as pipeline:
            for reservation in reservations:
                pipeline.filled([reservation])
        assert client.stats().active_reservations == 0  # the failed chunk changed nothing; the rest was aborted
        assert client.lookup(reg.layout_id, hashes) == []


def test_filling_a_slot_the_pipeline_does_not_own_is_refused(daemon: DaemonProcess) -> None:
    hashes = hash_prompt(list(range(16 * 3)), 16)
    with daemon.client() as client:
        reg = client.register_layout(LAYOUT)
        reservations = client.reserve(reg.layout_id, hashes)
        with pytest.raises(ValueError, match="not a pending reservation"), client.commit_pipeline(reservations[:2]) as pipeline:
            pipeline.filled([reservations[2]])
        assert client.stats().active_reservations == 1  # the pipeline aborted its own two only
        client.abort([reservations[2].reservation_id])
