"""What a load costs against what recomputing costs, measured as the engine runs.

A block that kvtier brings back is worth it only while bringing it back is faster than computing
it again. Two rates decide that, both measured in this engine:

- **Prefill cost per token**: the workers time each step's forward (from binding the step's
  metadata to the end of ``wait_for_save``, minus the time spent copying loads in; CUDA events on
  GPUs, read once they completed) and report ``(scheduled tokens, seconds)`` for steps that
  carried at least a few blocks. A step costs a fixed part (the model's pass, sampling) plus a
  part per token; a load saves only the second, so the estimate is the slope of a least-squares
  line through recent steps (time = fixed + slope x tokens), which is what recomputing a prefix
  adds to its request's step, bounded by the fastest seconds per token of recent large steps
  (which also stands in until steps of different sizes have been seen): a step slowed by other
  work on the cores (on a CPU engine, the connector's own saves) does not raise it. A new
  engine's first step (one-off costs) is not sampled.
- **Tier load time** (a fixed cost per load plus a cost per byte, fitted the same way): the
  scheduler times each asynchronous load from its start to the workers' report that it is in
  the engine (promotion, lease, copy and the engine's hand-offs: the whole wait as the request
  sees it), counting the bytes that arrived. Each tier's line starts from a conservative prior,
  which measured loads move and then replace.
- **Tier read time** (the same kind of line): the daemon's promotion alone (the worker's fetch
  call, a lookup's own promotion), which decides whether a lookup can bring a short run in
  itself.

:class:`LossBudget` turns them into the rule a waiting request follows: it may spend on kvtier at
most ``max_loss_fraction`` of its recompute time (at least ``min_loss_s``) beyond what the blocks
it got would have cost to compute. A request therefore never takes more than that much longer
than recomputing, whatever the daemon does: a stopped daemon costs the allowance and no more.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvtier.chain.promotion import FetchBudget

# Priors before a tier's first measured load: (bytes per second, seconds per load).
_TIER_PRIORS: dict[str, tuple[float, float]] = {
    "host": (4e9, 0.0005),
    "disk": (1e9, 0.002),
    "s3": (1e8, 0.03),
    "peer": (1e9, 0.005),  # another node's daemon (benchmarks/peer.py: ~1-2 GB/s over loopback, more on EFA)
}
_UNKNOWN_TIER = (1e8, 0.03)  # a tier this connector does not know (a new backend)
_SMOOTHING = 0.3  # weight of a new sample in the running estimates
_SEED_SECONDS = 0.05  # a seeded rate counts as one step of this length
_RECENT_LARGE = 8  # large samples whose lowest seconds-per-unit bounds the slope


class _LineFit:
    """An exponentially weighted least-squares line ``y = a + b x`` through (x, y) samples.

    The slope never exceeds the lowest ``y / x`` among the last few large samples (which, holding
    the fixed part too, bounds the true slope from above), and stands in for it until the samples'
    sizes spread enough for a line. Taking the lowest keeps one slow sample (a new engine's first
    step, a step that shared the cores with other work) from inflating the estimate."""

    def __init__(self) -> None:
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.max_x = 0.0
        self.largest: deque[float] = deque(maxlen=_RECENT_LARGE)  # y / x of recent large samples

    def add(self, x: float, y: float) -> None:
        if x <= 0 or y <= 0:
            return
        keep = 1 - _SMOOTHING / 4  # slower than the rates: a line needs several sizes of step
        self.n, self.sx, self.sy = keep * self.n + 1, keep * self.sx + x, keep * self.sy + y
        self.sxx, self.sxy = keep * self.sxx + x * x, keep * self.sxy + x * y
        self.max_x = max(x, self.max_x * keep)
        if x >= 0.5 * self.max_x:
            self.largest.append(y / x)

    def _line(self) -> tuple[float, float] | None:
        """(intercept, slope) when the samples' sizes spread enough for a line with a positive slope."""
        if self.n == 0:
            return None
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        variance = self.sxx / self.n - mean_x**2
        if variance > (0.25 * mean_x) ** 2:
            slope = (self.sxy / self.n - mean_x * mean_y) / variance
            if slope > 0:
                return max(0.0, mean_y - slope * mean_x), slope
        return None

    @property
    def _ratio(self) -> float | None:
        return min(self.largest) if self.largest else None

    @property
    def slope(self) -> float | None:
        """Seconds per unit of x; None before any sample."""
        line, ratio = self._line(), self._ratio
        return min(line[1], ratio) if line and ratio else ratio

    def predict(self, x: float) -> float | None:
        line = self._line()
        if line is not None:
            return line[0] + line[1] * x
        ratio = self._ratio
        return x * ratio if ratio else None


class Estimates:
    """Running prefill and tier-load rates of one engine (one per connector half)."""

    def __init__(self, min_prefill_tokens: int) -> None:
        self.min_prefill_tokens = min_prefill_tokens
        self._prefill = _LineFit()
        self._tiers: dict[str, _LineFit] = {}  # whole asynchronous loads
        self._reads: dict[str, _LineFit] = {}  # the daemon's promotions alone

    # ---- samples ----------------------------------------------------------------------------

    def observe_step(self, tokens: int, seconds: float) -> None:
        if tokens >= self.min_prefill_tokens:
            self._prefill.add(tokens, seconds)

    def seed_prefill(self, tokens_per_s: float) -> None:
        """Start from a rate measured elsewhere (an earlier engine of the same layout on this node);
        worth one typical step, so this engine's own steps take over quickly."""
        if tokens_per_s > 0 and self._prefill.slope is None:
            self._prefill.add(tokens_per_s * _SEED_SECONDS, _SEED_SECONDS)

    @staticmethod
    def _tier(fits: dict[str, _LineFit], tier: str) -> _LineFit:
        """A tier's time against bytes, seeded with its prior (two points on its prior line)."""
        fit = fits.get(tier)
        if fit is None:
            bandwidth, latency = _TIER_PRIORS.get(tier, _UNKNOWN_TIER)
            fit = fits[tier] = _LineFit()
            for nbytes in (64 << 10, 64 << 20):
                fit.add(nbytes, latency + nbytes / bandwidth)
        return fit

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        """An asynchronous load of ``nbytes`` whose slowest part came from ``tier`` took ``seconds``."""
        self._tier(self._tiers, tier).add(nbytes, seconds)

    def observe_read(self, tier: str, nbytes: int, seconds: float) -> None:
        """The daemon brought ``nbytes`` in from ``tier`` in ``seconds``."""
        self._tier(self._reads, tier).add(nbytes, seconds)

    # ---- predictions -------------------------------------------------------------------------

    @property
    def prefill_tokens_per_s(self) -> float | None:
        slope = self._prefill.slope
        return 1 / slope if slope else None

    def recompute_s(self, tokens: int) -> float | None:
        """Seconds that computing ``tokens`` more tokens adds to a step; None before any sample."""
        slope = self._prefill.slope
        return tokens * slope if slope else None

    def load_s(self, nbytes_by_tier: dict[str, int]) -> float:
        """Expected seconds a request waits for an asynchronous load of these bytes."""
        return sum(self._tier(self._tiers, tier).predict(nbytes) or 0.0 for tier, nbytes in nbytes_by_tier.items())

    def read_s(self, nbytes_by_tier: dict[str, int]) -> float:
        """Expected seconds for the daemon to bring these bytes into host memory."""
        return sum(self._tier(self._reads, tier).predict(nbytes) or 0.0 for tier, nbytes in nbytes_by_tier.items())


@dataclass(frozen=True, slots=True)
class LossBudget:
    """How long an asynchronous load may keep its request waiting.

    ``recompute_block_s``: seconds to compute one of its blocks (None: not measured yet; then a
    block is assumed to cost twice its expected load time, the least for which loading is tried).
    The request may lose at most ``allowance_s = max(max_loss_fraction * R(all blocks), min_loss_s)``
    against recomputing: the daemon keeps it waiting only while the time spent, less the compute
    time of the leading blocks that arrived, stays under the allowance (:meth:`fetch_budget`).
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

    def max_wait_s(self, spent_s: float = 0.0) -> float:
        """The longest the rule can ever let a request wait (every block arriving just in time),
        after ``spent_s`` already spent waiting."""
        return max(self.allowance_s - spent_s, 0.0) + self.blocks * self.block_s

    def fetch_budget(self, spent_s: float = 0.0) -> FetchBudget:
        """The rule as the daemon applies it while the request waits (``kvtier.chain.promotion``).

        ``spent_s``: how long the request has waited already before the daemon's clock starts (a
        queue for the loader thread, a reconnect after a daemon restart): it comes out of the
        allowance, so the bound holds from the moment the request began to wait. Once that is
        spent, it waits only while blocks arrive faster than computing them would take (which
        still shortens the request)."""
        return FetchBudget(self.block_s, max(self.allowance_s - spent_s, 0.0))
