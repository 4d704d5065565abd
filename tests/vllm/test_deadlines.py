"""Deadlines that mean what they say, without an engine: the link tells a late daemon from a gone
one (a real daemon, SIGSTOPped and killed), the loss budget bounds what a load may cost against
recomputing, the scheduler only tries deeper-tier loads that should beat recomputing, and a
worker's asynchronous load gives up with what arrived when the daemon stops answering."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from connectors.vllm.estimates import Estimates, LossBudget  # noqa: E402
from connectors.vllm.link import DaemonLink  # noqa: E402
from connectors.vllm.metadata import LoadSpec  # noqa: E402
from connectors.vllm.settings import settings_from  # noqa: E402
from kvtier.blocks import KVLayout, hash_prompt  # noqa: E402
from kvtier.testing.daemon import LocalDaemon, wait_until  # noqa: E402
from tests.vllm.fakes import fake_attention_backend  # noqa: E402, F401 - a fixture, used by name

pytestmark = pytest.mark.usefixtures("fake_attention_backend")  # the scheduler halves here run on fake configs

LAYOUT = KVLayout(model="test/tiny", dtype="float16", num_layers=2, num_kv_heads=2, head_size=64, block_size=16)
HASHES = hash_prompt(list(range(16 * 24)), 16)


@pytest.fixture
def daemon(small_daemon: LocalDaemon) -> LocalDaemon:
    return small_daemon


def make_link(daemon: LocalDaemon, **settings) -> DaemonLink:
    link = DaemonLink(settings_from({"socket_path": str(daemon.socket_path), "timeout_s": 0.3, **settings}), [LAYOUT],
                      client_id="deadline-test", role="test", stats=Counter())
    assert link.connect()
    return link


def test_a_late_daemon_is_skipped_until_it_answers_again(daemon: LocalDaemon) -> None:
    link = make_link(daemon, retry_after_s=60)
    try:
        assert link.call(lambda c: c.lookup(LAYOUT.layout_id, HASHES)) == []
        daemon.pause()
        assert link.call(lambda c: c.lookup(LAYOUT.layout_id, HASHES)) is None  # the call misses its deadline
        assert not link.available and link.stats["daemon_timeouts"] == 1
        ran: list[bool] = []
        assert link.call(lambda c: ran.append(True)) is None
        assert not ran, "while the daemon is late no call may wait for it"
        daemon.resume()
        assert wait_until(lambda: link.available, timeout=10), "the probe must notice the daemon answers again"
        # Late is not gone: no back-off (retry_after_s is a minute here), the same connection works.
        assert link.call(lambda c: c.lookup(LAYOUT.layout_id, HASHES)) == []
        assert link.stats["daemon_unreachable"] == 0
    finally:
        link.close()


def test_an_unreachable_daemon_is_backed_off_then_reconnected(daemon: LocalDaemon) -> None:
    link = make_link(daemon, retry_after_s=0.5)
    try:
        daemon.stop()
        assert link.call(lambda c: c.lookup(LAYOUT.layout_id, HASHES)) is None
        assert link.stats["daemon_unreachable"] == 1 and not link.available
        ran: list[bool] = []
        assert link.call(lambda c: ran.append(True)) is None and not ran  # backing off: no call at all
        daemon.start()
        assert wait_until(lambda: link.call(lambda c: c.lookup(LAYOUT.layout_id, HASHES)) == [], timeout=10)
    finally:
        link.close()


def test_a_restarted_daemon_ends_the_back_off_as_soon_as_it_is_back(daemon: LocalDaemon) -> None:
    """A restart takes a second or so: the link reconnects then (on new connections, registering
    its layout with the new daemon), not when its back-off of a minute is over."""
    link = make_link(daemon, retry_after_s=60)
    try:
        first = link.client.daemon_instance
        daemon.stop()
        assert link.call(lambda c: c.lookup(LAYOUT.layout_id, HASHES)) is None
        assert not link.available
        daemon.start()
        assert wait_until(lambda: link.available, timeout=20), "the link must notice the daemon is back"
        assert link.call(lambda c: c.lookup(LAYOUT.layout_id, HASHES)) == []
        assert link.client.daemon_instance not in (None, first) and link.stats["daemon_unreachable"] == 1
    finally:
        link.close()


def test_a_refused_call_is_one_miss_not_a_back_off(daemon: LocalDaemon) -> None:
    link = make_link(daemon, retry_after_s=60)
    try:
        assert link.call(lambda c: c.lookup(LAYOUT.layout_id, [b"short"])) is None  # INVALID_ARGUMENT
        assert link.stats["daemon_refused"] == 1 and link.available
        assert link.call(lambda c: c.lookup(LAYOUT.layout_id, HASHES)) == []
    finally:
        link.close()


def test_loss_budget_bounds_the_cost_of_waiting() -> None:
    budget = LossBudget(blocks=100, recompute_block_s=0.01, expected_s=0.1, max_loss_fraction=0.05, min_loss_s=0.001)
    assert budget.allowance_s == pytest.approx(0.05)  # 5% of the 1 s it takes to recompute all
    rule = budget.fetch_budget()  # as the daemon applies it
    assert rule.remaining_s(0.04, got=0) > 0
    assert rule.remaining_s(0.05, got=0) <= 0  # nothing arrived: the allowance is spent
    assert rule.remaining_s(0.5, got=50) > 0  # what arrived paid for the wait
    assert rule.remaining_s(0.56, got=50) <= 0
    # Whenever the rule stops a load, recomputing the rest costs at most the allowance more than
    # recomputing everything: elapsed + (blocks - got) * block_s <= blocks * block_s + allowance.
    for got in range(0, 101, 10):
        for step in range(0, 2000):
            elapsed = step * 0.001
            if rule.remaining_s(elapsed, got) <= 0:
                assert elapsed + (100 - got) * 0.01 <= 1.0 + budget.allowance_s + 0.002  # one step of the loop
                break
    assert budget.max_wait_s() == pytest.approx(1.05)
    # Time the request already spent before the daemon's clock started comes out of the allowance.
    late = budget.fetch_budget(spent_s=0.03)
    assert late.remaining_s(0.019, got=0) > 0 and late.remaining_s(0.021, got=0) <= 0
    assert budget.max_wait_s(spent_s=0.03) == pytest.approx(1.02)
    spent = budget.fetch_budget(spent_s=0.2)  # all of it spent: it waits only for blocks arriving faster than computing them
    assert spent.remaining_s(0.001, got=0) <= 0 and spent.remaining_s(0.11, got=10) <= 0 and spent.remaining_s(0.09, got=10) > 0
    assert budget.max_wait_s(spent_s=0.2) == pytest.approx(1.0)
    assert LossBudget(4, 0.001, 0.001, 0.05, 0.01).allowance_s == 0.01  # the floor
    unknown = LossBudget(blocks=10, recompute_block_s=None, expected_s=0.02, max_loss_fraction=0.05, min_loss_s=0.001)
    assert unknown.block_s == pytest.approx(0.004)  # assumed twice the expected load


def test_promotion_waits_under_a_rule_re_judged_as_blocks_arrive() -> None:
    import threading

    from kvtier.chain.promotion import Promotion

    promotion = Promotion(3)
    promotion.settle(1, True)
    assert promotion.leading == 0 and not promotion.finished  # block 0 is still missing
    threading.Timer(0.05, promotion.settle, (0, True)).start()
    seen: list[int] = []
    assert not promotion.wait(lambda elapsed, got: (seen.append(got), 5.0 if got < 2 else 0.0)[1])
    assert promotion.leading == 2 and seen[-1] == 2  # woken when block 0 arrived, and stopped by the rule
    promotion.settle(2, False)
    assert promotion.finished and promotion.result(0) == 2


def test_estimates_learn_rates_and_keep_priors_until_then() -> None:
    estimates = Estimates(min_prefill_tokens=64)
    assert estimates.recompute_s(1000) is None
    estimates.observe_step(16, 1.0)  # a decode step: not a prefill rate
    assert estimates.recompute_s(1000) is None
    estimates.seed_prefill(10_000)
    assert estimates.recompute_s(1000) == pytest.approx(0.1)
    estimates.observe_step(2000, 0.12)
    assert estimates.recompute_s(1000) < 0.09  # a faster marginal rate measured here takes over
    estimates.observe_step(200, 0.03)  # steps of several sizes: the slope of time over tokens
    estimates.observe_step(1000, 0.07)
    assert estimates.recompute_s(1000) == pytest.approx(0.05, rel=0.3)
    prior = estimates.load_s({"disk": 100 << 20})
    estimates.observe_load("disk", 100 << 20, 1.0)  # a slow disk: ~100 MiB/s
    assert estimates.load_s({"disk": 100 << 20}) > 5 * prior
    assert estimates.load_s({"s3": 1 << 20}) > estimates.load_s({"disk": 1 << 20})


def test_a_slow_step_does_not_raise_the_recompute_estimate() -> None:
    """Steps slowed by other work on the cores (a new engine's first step, the saver sharing a
    CPU engine's cores) must not make recomputing look dearer, or slow loads would look worth it."""
    estimates = Estimates(min_prefill_tokens=64)
    for seconds in (0.10, 0.25, 0.11, 0.24):  # same-sized steps, half of them slowed down
        estimates.observe_step(4000, seconds)
    assert estimates.recompute_s(4000) == pytest.approx(0.10)
    for tokens, seconds in ((500, 0.05), (2000, 0.5), (4000, 0.1), (1000, 0.04)):  # a line, one point slowed
        estimates.observe_step(tokens, seconds)
    assert estimates.recompute_s(4000) <= 0.1


def _scheduler(tmp_path: Path, **settings):
    """A scheduler half whose daemon is unreachable (its decisions need none)."""
    from connectors.vllm.scheduler import SchedulerSide
    from tests.vllm.fakes import fake_configs

    vllm_config, kv_cache_config = fake_configs()
    return SchedulerSide(vllm_config, kv_cache_config, settings_from({"socket_path": str(tmp_path / "none.sock"),
                                                                      "model_revision": "test-weights", **settings}))


def test_deeper_tiers_are_loaded_only_when_they_beat_recomputing(tmp_path: Path) -> None:
    from connectors.vllm.scheduler import _Lookup

    scheduler = _scheduler(tmp_path)
    try:
        found = _Lookup(["host"] * 4 + ["disk"] * 60, {}, "run", host_run=4)
        decision = scheduler._decide(found, start=0)
        assert decision.budget is not None and decision.count == 64  # nothing measured: try it, within a budget
        scheduler.estimates.seed_prefill(1e9)  # recomputing is nearly free: loading cannot win
        decision = scheduler._decide(found, start=0)
        assert decision.budget is None and decision.count == 4  # only the host run, synchronously
        assert scheduler.stats["loads_declined"] == 1
        assert scheduler._decide(found, start=4) is None  # past the host run: nothing worth loading
    finally:
        scheduler.shutdown()


def test_a_lookup_promotes_small_deeper_runs_itself(tmp_path: Path) -> None:
    """A few blocks on disk, expected within half the lookup's allowance, are promoted by the
    lookup (and then load synchronously); a long run is left to an asynchronous load."""
    scheduler = _scheduler(tmp_path)
    try:
        tiers = ["host"] * 4 + ["disk"] * 4
        assert scheduler._promotion_in_lookup(tiers, 4, allowance_s=0.01) is None  # recompute not measured yet
        scheduler.estimates.seed_prefill(1000.0)  # 16 ms per 16-token block
        budget = scheduler._promotion_in_lookup(tiers, 4, allowance_s=0.02)
        assert budget is not None and budget.allowance_s == pytest.approx(0.01) and budget.block_s == pytest.approx(0.016)
        assert scheduler._promotion_in_lookup(["host"] * 4, 4, allowance_s=0.02) is None  # nothing below host memory
        assert scheduler._promotion_in_lookup(["host"] * 4 + ["s3"] * 4000, 4, allowance_s=0.02) is None  # too long
    finally:
        scheduler.shutdown()


def test_a_lookup_leases_the_disk_run_it_promoted(daemon: LocalDaemon, tmp_path: Path) -> None:
    """Against a real daemon whose blocks sit on disk only (restarted: host memory empty)."""
    scheduler = _scheduler(tmp_path, socket_path=str(daemon.socket_path))
    try:
        with daemon.client() as client:
            client.register_layout(scheduler.layouts[0])
            client.write_blocks(scheduler.layouts[0].layout_id,
                                {h: bytes([i]) * scheduler.block_nbytes for i, h in enumerate(HASHES[:8])})
        assert daemon.wait_for_demotions()
        daemon.restart()  # blocks now on disk only
        layout_id = scheduler.layouts[0].layout_id
        assert wait_until(lambda: scheduler.link.call(lambda c: c.lookup(layout_id, [])) is not None, timeout=20)
        scheduler.estimates.seed_prefill(1000.0)
        found = scheduler._lookup(list(HASHES[:8]), allowance_s=2.0)
        assert found.host_run == 8 and found.tiers == ["host"] * 8
        grant = found.grants[scheduler.layouts[0].layout_id]
        assert [b.block_hash for b in grant.blocks] == list(HASHES[:8])
        assert scheduler.stats["lookup_promoted_blocks"] == 8
        decision = scheduler._decide(found, start=0)
        assert decision.budget is None and decision.count == 8  # a synchronous load
        scheduler._release_lookup(found)
    finally:
        scheduler.shutdown()


def test_a_prompt_is_hashed_on_the_lookup_thread_not_the_scheduler_step(daemon: LocalDaemon, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    from types import SimpleNamespace

    from kvtier.blocks import PrefixHasher

    hashed_on: list[str] = []
    update = PrefixHasher.update

    def recording_update(self, tokens):
        hashed_on.append(threading.current_thread().name)
        return update(self, tokens)

    monkeypatch.setattr(PrefixHasher, "update", recording_update)
    scheduler = _scheduler(tmp_path, socket_path=str(daemon.socket_path))
    try:
        assert wait_until(lambda: scheduler.link.available, timeout=20)
        request = SimpleNamespace(request_id="r1", all_token_ids=list(range(16 * 24)), num_prompt_tokens=16 * 24,
                                  lora_request=None, cache_salt=None, mm_features=None)
        scheduler.on_new_request(request)
        state = scheduler.requests["r1"]
        found = state.pending_lookup.result(timeout=10)
        assert found is not None and found.tiers == []  # nothing saved yet: a miss
        assert state.hasher.hashes == list(HASHES[:23])  # every block before the one holding the last token
        assert hashed_on and all(name.startswith("kvtier-lookup") for name in hashed_on), hashed_on
    finally:
        scheduler.shutdown()


def test_saves_never_reach_past_the_tokens_known_when_the_step_is_planned(tmp_path: Path) -> None:
    """Async scheduling plans a step before the tokens it feeds are known: those blocks wait."""
    from types import SimpleNamespace

    from connectors.vllm.metadata import KVTierConnectorMetadata

    scheduler = _scheduler(tmp_path, save_generated=True)
    try:
        request = SimpleNamespace(request_id="r1", all_token_ids=list(range(16 * 5 + 3)), num_prompt_tokens=16 * 4,
                                  lora_request=None, cache_salt=None, mm_features=None)
        state = scheduler._state(request)
        state.block_ids = list(range(8))
        meta = KVTierConnectorMetadata()
        scheduler._plan_save("r1", state, 16 * 7, meta)  # computed: 2 blocks past the 5 whose tokens are known
        assert [len(spec.block_ids) for spec in meta.saves] == [5]
        assert list(meta.saves[0].block_hashes) == list(hash_prompt(request.all_token_ids, 16)[:5])
        request.all_token_ids.extend(range(16 * 2))  # the step's outputs arrived
        later = KVTierConnectorMetadata()
        scheduler._plan_save("r1", state, 16 * 7, later)
        assert [spec.block_ids for spec in later.saves] == [(5, 6)]
    finally:
        scheduler.shutdown()


def test_a_request_waits_for_one_asynchronous_load_at_most(tmp_path: Path) -> None:
    """After a partial load vLLM asks again; a second wait would spend a second allowance."""
    from connectors.vllm.scheduler import _Lookup

    scheduler = _scheduler(tmp_path)
    try:
        found = _Lookup(["host"] * 4 + ["disk"] * 60, {}, "run", host_run=4)
        assert scheduler._decide(found, start=0).budget is not None
        decision = scheduler._decide(found, start=0, allow_async=False)
        assert decision.budget is None and decision.count == 4  # what is in host memory now, synchronously
    finally:
        scheduler.shutdown()


def test_a_given_up_load_teaches_the_tier_estimate_what_arrived(tmp_path: Path) -> None:
    """A load of 64 blocks given up after 2 arrived in 0.2 s says the tier moves about 2 blocks
    in 0.2 s, not 64; the worker's wait before asking the daemon (a reconnect) is not counted."""
    import time

    from vllm.v1.outputs import KVConnectorOutput

    from connectors.vllm.metadata import AsyncLoaded, KVTierWorkerMetadata

    scheduler = _scheduler(tmp_path)
    try:
        nbytes = 64 * scheduler.block_nbytes
        prior = scheduler.estimates.load_s({"s3": nbytes})
        for index in range(4):
            scheduler._async_started[f"r{index}"] = (time.monotonic() - 0.5, "s3")
            meta = KVTierWorkerMetadata(async_loaded={f"r{index}": AsyncLoaded(2, 0.3, 0.15)})  # 0.3 s of the 0.5 s before the fetch
            scheduler.update_connector_output(KVConnectorOutput(finished_recving={f"r{index}"}, kv_connector_worker_meta=meta))
        per_two = scheduler.estimates.load_s({"s3": 2 * scheduler.block_nbytes})
        assert 0.1 < per_two < 0.35  # about 0.2 s for two blocks, not 0.5 s
        assert scheduler.estimates.load_s({"s3": nbytes}) > 3 * prior  # 64 blocks now look far dearer than the prior
        assert 0.05 < scheduler.estimates.read_s({"s3": 2 * scheduler.block_nbytes}) < per_two  # the daemon's part of it
    finally:
        scheduler.shutdown()


def test_an_async_load_gives_up_when_the_daemon_stops(daemon: LocalDaemon) -> None:
    """The loader thread's promotion against a real daemon: all of it when the blocks are there;
    stopped, the call's deadline is what the budget has left (a fraction of a second), not the
    link's call deadline (half a minute here). Checked loosely: this is no timing test."""
    import time

    from connectors.vllm.worker import promote_and_lease
    from kvtier.errors import DaemonTimeoutError

    link = make_link(daemon, timeout_s=30)  # the link's call deadline: never what a fetch waits for
    client = link.client
    client.write_blocks(LAYOUT.layout_id, {h: bytes([i]) * LAYOUT.block_nbytes for i, h in enumerate(HASHES)})
    budget = LossBudget(len(HASHES), 0.001, 0.001, 0.05, 0.05)
    spec = LoadSpec("r", tuple(range(len(HASHES))), tuple(HASHES), budget=budget, tier="disk")
    try:
        fetched = promote_and_lease(client, LAYOUT.layout_id, spec)
        assert len(fetched.lease.blocks) == len(HASHES) and fetched.done and not fetched.gave_up
        client.release(fetched.lease.lease_id)
        daemon.pause()
        started = time.monotonic()
        with pytest.raises(DaemonTimeoutError):
            promote_and_lease(client, LAYOUT.layout_id, spec)
        assert time.monotonic() - started < 10
    finally:
        daemon.resume()
        link.close()
