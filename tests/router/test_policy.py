"""The routing policies' conformance suite: what every policy guarantees, then what each one
chooses. Replicas here are the router's own records of replicas (data, no server behind them)."""

from __future__ import annotations

from collections import Counter

import pytest

from kvtier.errors import ConfigError
from kvtier.router.policy import POLICIES, CachedPrefix, RouteRequest, make_policy
from kvtier.router.replicas import Replica, nodes_by_host, parse_dns_target, parse_replica


def replicas(*loads: int) -> list[Replica]:
    return [Replica(f"http://10.0.0.{i}:8000", node=f"n{i}", in_flight=load) for i, load in enumerate(loads)]


NO_SCORES = RouteRequest(prompt_tokens=0, cached=None)


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_chooses_among_its_candidates_and_spreads_equal_replicas(name: str) -> None:
    policy = make_policy(name)
    pool = replicas(0, 0, 0)
    chosen = Counter(policy.choose(pool, NO_SCORES).replica.url for _ in range(30))
    assert set(chosen) == {r.url for r in pool}
    assert max(chosen.values()) - min(chosen.values()) <= 1
    for subset in (pool[:1], pool[1:]):
        assert policy.choose(subset, RouteRequest(100, {"n0": CachedPrefix(100, 100.0)})).replica in subset


@pytest.mark.parametrize("name", ["prefix", "least-loaded"])
def test_load_aware_policies_send_requests_without_scores_to_the_least_loaded(name: str) -> None:
    pool = replicas(3, 1, 2)
    decision = make_policy(name).choose(pool, RouteRequest(1000, None))
    assert decision.replica is pool[1]
    assert decision.cached_tokens == 0


def test_least_loaded_counts_what_the_replica_reports_beyond_the_router() -> None:
    pool = replicas(0, 0)
    pool[0].waiting = 5  # another router's requests queue there
    assert make_policy("least-loaded").choose(pool, NO_SCORES).replica is pool[1]


def test_prefix_goes_where_the_prompt_is_cached() -> None:
    pool = replicas(0, 0, 0)
    request = RouteRequest(2000, {"n2": CachedPrefix(1984, 1984 * 0.9), "n0": CachedPrefix(64, 64.0)})
    decision = make_policy("prefix").choose(pool, request)
    assert decision.replica is pool[2]
    assert decision.cached_tokens == 1984
    assert "1984/2000 cached on n2" in decision.reason
    assert set(decision.costs) == {r.url for r in pool}


def test_prefix_weighs_the_cache_against_the_work_already_waiting() -> None:
    pool = replicas(0, 0)
    request = RouteRequest(1000, {"n0": CachedPrefix(500, 500.0)})
    policy = make_policy("prefix", load_tokens_per_request=0)
    assert policy.choose(pool, request).replica is pool[0]
    pool[0].pending_prefill_tokens = 800  # n0 still has 800 prompt tokens to compute before this one
    assert policy.choose(pool, request).replica is pool[1]


def test_prefix_never_piles_onto_a_hot_replica_past_the_imbalance_bound() -> None:
    pool = replicas(0, 0)
    policy = make_policy("prefix", max_imbalance=3)
    request = RouteRequest(4000, {"n0": CachedPrefix(3968, 3968.0)})
    sent = Counter()
    for _ in range(20):
        decision = policy.choose(pool, request)
        decision.replica.in_flight += 1  # nothing finishes meanwhile
        sent[decision.replica.node] += 1
    assert sent["n1"] > 0
    assert abs(pool[0].in_flight - pool[1].in_flight) <= 3


def test_prefix_without_a_known_node_treats_the_replica_as_holding_nothing() -> None:
    pool = replicas(0, 0)
    pool[0].node = None
    decision = make_policy("prefix").choose(pool, RouteRequest(1000, {"n0": CachedPrefix(1000, 1000.0)}))
    assert decision.replica is pool[1] or decision.cached_tokens == 0


def test_an_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="round-robin"):
        make_policy("random")


@pytest.mark.parametrize("spec, node, url", [
    ("http://10.0.0.5:8000", None, "http://10.0.0.5:8000"),
    ("gpu-a=http://10.0.0.5:8000/", "gpu-a", "http://10.0.0.5:8000"),
    ("https://vllm.internal:443", None, "https://vllm.internal:443"),
])
def test_replica_specs(spec: str, node: str | None, url: str) -> None:
    replica = parse_replica(spec)
    assert (replica.node, replica.url, replica.node_explicit) == (node, url, node is not None)


@pytest.mark.parametrize("spec", ["10.0.0.5:8000", "a=ftp://x:1", "http://10.0.0.5:8000/v1", "a="])
def test_bad_replica_specs_say_what_is_expected(spec: str) -> None:
    with pytest.raises(ConfigError, match="NODE=URL|base URL"):
        parse_replica(spec)


def test_dns_targets_and_nodes_by_address() -> None:
    assert parse_dns_target("dns:vllm.default.svc.cluster.local:8000") == ("vllm.default.svc.cluster.local", 8000)
    with pytest.raises(ConfigError, match="dns:NAME:PORT"):
        parse_dns_target("dns:vllm")
    assert nodes_by_host({"a": "10.0.0.5:7450", "b": "[fd00::1]:7450", "c": ""}) == {"10.0.0.5": "a", "fd00::1": "b"}


def test_replica_load_from_vllm_metrics() -> None:
    replica = Replica("http://x:1")
    replica.observe_metrics('# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n'
                            'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
                            '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n')
    assert (replica.running, replica.waiting, replica.load) == (3, 2, 5)
    replica.in_flight = 7
    assert replica.load == 7
