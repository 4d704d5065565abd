"""What a load costs against what recomputing costs, measured as the engine runs.

A block that kvtier brings back is worth it only while bringing it back is faster than computing
it again. Two rates decide that, both measured in this engine:

- **Prefill rate** (tokens per second): the workers time each step's forward (from binding the
  step's metadata to the end of ``wait_for_save``; CUDA events on GPUs, read once they completed)
  and report ``(scheduled tokens, seconds)`` for steps that carried at least a few blocks of
  prefill. Steps mix prefill with decode and a request shares a step with others, so this is the
  engine's best throughput: the recompute time it predicts is a lower bound, which makes every
  decision below err towards recomputing.
- **Tier bandwidth** (bytes per second, plus a fixed cost per load): the workers time each load
  from disk or S3 (promotion by the daemon until the blocks are leased) and report
  ``(tier, bytes, seconds)``. Until a tier has been measured, a conservative prior stands.

:class:`LossBudget` turns them into the rule a waiting request follows: it may spend on kvtier at
most ``max_loss_fraction`` of its recompute time (at least ``min_loss_s``) beyond what the blocks
it got would have cost to compute. A request therefore never takes more than that much longer
than recomputing, whatever the daemon does: a stopped daemon costs the allowance and no more.
"""

from __future__ import annotations

from dataclasses import dataclass

# Priors before a tier's first measured load: (bytes per second, seconds per load).
_TIER_PRIORS: dict[str, tuple[float, float]] = {
    "host": (4e9, 0.0005),
    "disk": (1e9, 0.002),
    "s3": (1e8, 0.03),
}
_UNKNOWN_TIER = (1e8, 0.03)  # a tier this connector does not know (a peer, a new backend)
_SMOOTHING = 0.3  # weight of a new sample in the running estimates
_SEED_SECONDS = 0.05  # a seeded rate counts as one step of this length


class _Rate:
    """An exponentially weighted ratio of two sums (amount / seconds), robust to uneven samples."""

    def __init__(self) -> None:
        self.amount = 0.0
        self.seconds = 0.0

    def add(self, amount: float, seconds: float) -> None:
        if amount <= 0 or seconds <= 0:
            return
        if self.seconds == 0:
            self.amount, self.seconds = amount, seconds
        else:
            self.amount = (1 - _SMOOTHING) * self.amount + _SMOOTHING * amount
            self.seconds = (1 - _SMOOTHING) * self.seconds + _SMOOTHING * seconds

    @property
    def per_second(self) -> float | None:
        return self.amount / self.seconds if self.seconds > 0 else None


class Estimates:
    """Running prefill and tier-load rates of one engine (one per connector half)."""

    def __init__(self, min_prefill_tokens: int) -> None:
        self.min_prefill_tokens = min_prefill_tokens
        self._prefill = _Rate()
        self._tiers: dict[str, _Rate] = {}

    # ---- samples ----------------------------------------------------------------------------

    def observe_step(self, tokens: int, seconds: float) -> None:
        if tokens >= self.min_prefill_tokens:
            self._prefill.add(tokens, seconds)

    def seed_prefill(self, tokens_per_s: float) -> None:
        """Start from a rate measured elsewhere (an earlier engine of the same layout on this node);
        worth one typical step, so this engine's own steps take over quickly."""
        if tokens_per_s > 0 and self._prefill.per_second is None:
            self._prefill.add(tokens_per_s * _SEED_SECONDS, _SEED_SECONDS)

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        """A load of ``nbytes`` whose slowest part came from ``tier`` took ``seconds``."""
        _, latency = _TIER_PRIORS.get(tier, _UNKNOWN_TIER)
        self._tiers.setdefault(tier, _Rate()).add(nbytes, max(seconds - latency, seconds * 0.1))

    # ---- predictions -------------------------------------------------------------------------

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self._prefill.per_second

    def recompute_s(self, tokens: int) -> float | None:
        """Seconds to compute ``tokens`` tokens at the measured rate; None before any sample."""
        rate = self._prefill.per_second
        return tokens / rate if rate else None

    def load_s(self, nbytes_by_tier: dict[str, int]) -> float:
        """Expected seconds to bring these bytes into host memory and lease them."""
        total = 0.0
        for tier, nbytes in nbytes_by_tier.items():
            prior_bandwidth, latency = _TIER_PRIORS.get(tier, _UNKNOWN_TIER)
            measured = self._tiers.get(tier)
            bandwidth = (measured.per_second if measured else None) or prior_bandwidth
            total = max(total, latency) + nbytes / bandwidth  # tiers are read one after another
        return total


@dataclass(frozen=True, slots=True)
class LossBudget:
    """How long an asynchronous load may keep its request waiting.

    ``recompute_block_s``: seconds to compute one of its blocks (None: not measured yet; then a
    block is assumed to cost twice its expected load time, the least for which loading is tried).
    The request may lose at most ``max(max_loss_fraction * R(all blocks), min_loss_s)`` against
    recomputing: :meth:`keep_waiting` says whether, ``elapsed_s`` after the load started with
    ``got`` leading blocks in host memory, waiting longer can still beat that.
    """

    blocks: int
    recompute_block_s: float | None
    expected_s: float
    max_loss_fraction: float
    min_loss_s: float

    @property
    def block_s(self) -> float:
        if self.recompute_block_s is not None:
            return self.recompute_block_s
        return 2 * self.expected_s / max(self.blocks, 1)

    @property
    def allowance_s(self) -> float:
        return max(self.max_loss_fraction * self.block_s * self.blocks, self.min_loss_s)

    def keep_waiting(self, elapsed_s: float, got: int) -> bool:
        """Time spent minus the compute time of what it bought stays within the allowance."""
        return elapsed_s - got * self.block_s < self.allowance_s

    def remaining_s(self, elapsed_s: float, got: int) -> float:
        """How much longer waiting stays within the allowance with ``got`` blocks so far."""
        return max(0.0, self.allowance_s + got * self.block_s - elapsed_s)
