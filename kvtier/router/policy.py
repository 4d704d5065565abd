"""Routing policies: which replica takes a request. One interface, three backends.

- ``prefix`` (default): the replica that will finish the request's prefill first, as the index
  and the router's own accounting estimate it. Its cost, in prompt tokens: the tokens it would
  compute (the prompt less what its node caches, each cached block weighted by its tier), plus
  the prefill tokens of the router's requests it has not started answering, plus
  ``load_tokens_per_request`` per request running there. A replica ``max_imbalance`` requests
  busier than the least busy one is passed over whatever it caches, so one hot prefix cannot
  pile every request onto one replica. Without scores (the index down, slow or not
  configured; a prompt the router cannot tokenize) it is ``least-loaded``.
- ``round-robin``: each replica in turn.
- ``least-loaded``: the fewest requests in the replica, then the fewest pending prefill
  tokens, then in turn.

Every policy chooses among the candidates it is given (the replicas up, less those a request
already failed on) and never returns one outside them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvtier.errors import ConfigError
from kvtier.router.replicas import Replica


@dataclass(frozen=True)
class CachedPrefix:
    """What the index says one node holds of a prompt."""

    tokens: int  # the cached prefix's length
    saved_tokens: float  # tokens it saves, each block weighted by its tier (GPU 1.0 ... S3 0.5)


@dataclass(frozen=True)
class RouteRequest:
    prompt_tokens: int  # 0 when the prompt could not be tokenized
    cached: Mapping[str, CachedPrefix] | None  # by node; None when the index gave no answer


@dataclass(frozen=True)
class Decision:
    replica: Replica
    policy: str
    cached_tokens: int  # of the chosen replica's node (0 when unknown)
    reason: str
    costs: dict[str, float] = field(default_factory=dict)  # by replica URL, where the policy computed them


class RoutingPolicy(Protocol):
    name: str
    uses_index: bool

    def choose(self, candidates: Sequence[Replica], request: RouteRequest) -> Decision: ...


class RoundRobinPolicy:
    name = "round-robin"
    uses_index = False

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Replica], request: RouteRequest) -> Decision:
        replica = candidates[next(self._turn) % len(candidates)]
        return Decision(replica, self.name, _cached_on(replica, request), "in turn")


class LeastLoadedPolicy:
    name = "least-loaded"
    uses_index = False

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Replica], request: RouteRequest) -> Decision:
        return least_loaded(candidates, request, next(self._turn), self.name, "fewest requests in the replica")


class PrefixPolicy:
    name = "prefix"
    uses_index = True

    def __init__(self, load_tokens_per_request: int = 256, max_imbalance: int = 8) -> None:
        self.load_tokens_per_request = load_tokens_per_request
        self.max_imbalance = max_imbalance
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Replica], request: RouteRequest) -> Decision:
        turn = next(self._turn)
        if request.cached is None or not request.prompt_tokens:
            why = "no prompt tokens" if not request.prompt_tokens else "no index scores"
            return least_loaded(candidates, request, turn, self.name, f"{why}: fewest requests in the replica")
        lightest = min(replica.load for replica in candidates)
        eligible = [r for r in candidates if r.load < lightest + self.max_imbalance]
        costs = {r.url: self.cost(r, request) for r in eligible}
        best = min(costs.values())
        tied = [r for r in eligible if costs[r.url] == best]
        replica = tied[turn % len(tied)]
        cached = _cached_on(replica, request)
        reason = f"least work: {best:.0f} tokens ({cached}/{request.prompt_tokens} cached on {replica.describe()})"
        if len(eligible) < len(candidates):
            reason += f"; {len(candidates) - len(eligible)} replica(s) {self.max_imbalance}+ requests busier passed over"
        return Decision(replica, self.name, cached, reason, costs)

    def cost(self, replica: Replica, request: RouteRequest) -> float:
        saved = request.cached.get(replica.node, None) if (request.cached and replica.node) else None
        to_compute = request.prompt_tokens - (saved.saved_tokens if saved else 0.0)
        return max(to_compute, 0.0) + replica.pending_prefill_tokens + self.load_tokens_per_request * replica.load


def least_loaded(candidates: Sequence[Replica], request: RouteRequest, turn: int, policy: str, reason: str) -> Decision:
    """The fewest requests, then the fewest pending prefill tokens; ties in turn."""
    key = min((r.load, r.pending_prefill_tokens) for r in candidates)
    tied = [r for r in candidates if (r.load, r.pending_prefill_tokens) == key]
    replica = tied[turn % len(tied)]
    return Decision(replica, policy, _cached_on(replica, request), reason)


def _cached_on(replica: Replica, request: RouteRequest) -> int:
    if request.cached is None or replica.node is None:
        return 0
    found = request.cached.get(replica.node)
    return found.tokens if found else 0


POLICIES = ("prefix", "round-robin", "least-loaded")


def make_policy(name: str, load_tokens_per_request: int = 256, max_imbalance: int = 8) -> RoutingPolicy:
    if name == "prefix":
        return PrefixPolicy(load_tokens_per_request, max_imbalance)
    if name == "round-robin":
        return RoundRobinPolicy()
    if name == "least-loaded":
        return LeastLoadedPolicy()
    raise ConfigError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
