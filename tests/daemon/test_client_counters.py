"""The daemon's board of client counters: checked before stored, one report per client, bounded."""

from __future__ import annotations

import pytest

from kvtier.daemon.client_counters import MAX_CLIENTS, MAX_COUNTERS, ClientCounterBoard, ClientCounters, failure_totals
from kvtier.errors import InvalidRequestError


def test_a_report_replaces_the_last_and_ages() -> None:
    now = [100.0]
    board = ClientCounterBoard(clock=lambda: now[0])
    board.report("a", "vllm-worker", {"loaded_blocks": 1}, {})
    now[0] += 2
    board.report("b", "vllm-scheduler", {"lookups": 3, "lookup_late": 1}, {"lookup_late": 1})
    board.report("a", "vllm-worker", {"loaded_blocks": 4, "load_corrupt": 1}, {"load_corrupt": 1})
    now[0] += 1
    assert board.snapshot() == [
        ClientCounters("b", "vllm-scheduler", {"lookups": 3, "lookup_late": 1}, {"lookup_late": 1}, 1.0),
        ClientCounters("a", "vllm-worker", {"loaded_blocks": 4, "load_corrupt": 1}, {"load_corrupt": 1}, 1.0),
    ]
    assert failure_totals(board.snapshot()) == {"load_corrupt": 1, "lookup_late": 1}


@pytest.mark.parametrize(("role", "counters"), [
    ("", {}),
    ("r" * 65, {}),
    ("vllm-worker", {"Upper": 1}),
    ("vllm-worker", {"ok": -1}),
    ("vllm-worker", {"ok": 1 << 64}),
    ("vllm-worker", {"ok": 1.5}),
    ("vllm-worker", {f"c{i}": 1 for i in range(MAX_COUNTERS + 1)}),
])
def test_bad_reports_are_refused_and_change_nothing(role: str, counters: dict) -> None:
    board = ClientCounterBoard()
    board.report("a", "vllm-worker", {"loaded_blocks": 1}, {})
    with pytest.raises(InvalidRequestError):
        board.report("a", role, counters, {})
    assert [c.counters for c in board.snapshot()] == [{"loaded_blocks": 1}]


def test_the_least_recently_reported_clients_are_dropped_first() -> None:
    board = ClientCounterBoard()
    for n in range(MAX_CLIENTS + 10):
        board.report(f"client-{n}", "vllm-worker", {"n": n}, {})
    kept = [c.client_id for c in board.snapshot()]
    assert len(kept) == MAX_CLIENTS and kept[0] == "client-10"  # 0-9 dropped
    board.report("client-10", "vllm-worker", {"n": 10}, {})  # reported again: now the newest
    board.report("client-new", "vllm-worker", {}, {})  # drops the least recent: client-11
    kept = [c.client_id for c in board.snapshot()]
    assert len(kept) == MAX_CLIENTS and kept[-2:] == ["client-10", "client-new"] and "client-11" not in kept
