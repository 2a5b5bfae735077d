"""Paired timing statistics: is method A faster than method B on a machine whose speed drifts?

The timing machines here drift by ±20 % within minutes (the same matrix product, alone, varies that much), so a
ratio of two medians can differ from 1 by a few per cent by chance. The benchmarks time their methods in rounds,
one repetition of each per round. Within a round both methods see about the same machine, so the per-round ratio
:math:`r_i = a_i / b_i` cancels most of the drift. Its median comes with a distribution-free confidence interval
from the sign test: for sorted ratios :math:`r_{(1)} \\le \\dots \\le r_{(n)}`, the interval
:math:`[r_{(k)}, r_{(n+1-k)}]` covers the median ratio with probability
:math:`1 - 2\\,P(\\mathrm{Bin}(n, \\tfrac12) \\le k - 1)`, and ``k`` is the largest for which that is at least the
asked-for level (Conover, *Practical Nonparametric Statistics*, 3rd ed., 1999, §3.2). Where ``n`` is too small for
the level, the whole range is returned with the coverage it has (5 rounds: 93.75 %).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MIN_COVERAGE = 0.9  # below it (n < 5) no verdict is drawn


@dataclass(frozen=True)
class PairedRatio:
    """Median of per-round ratios a/b with a sign-test confidence interval."""

    median: float
    low: float
    high: float
    coverage: float  # probability that [low, high] covers the median ratio
    n: int

    @property
    def verdict(self) -> str:
        """``faster`` (the interval lies below 1), ``slower`` (above 1), ``tie`` (it holds 1), or ``too few rounds``
        (coverage under :data:`MIN_COVERAGE`: fewer than 5 rounds)."""
        if self.coverage < MIN_COVERAGE:
            return "too few rounds"
        if self.high < 1.0:
            return "faster"
        if self.low > 1.0:
            return "slower"
        return "tie"

    def against(self, bound: float) -> str:
        """Where the interval lies against a target ratio ``bound`` (ours ≤ 1.5× the floor): ``within`` (wholly at
        or below it), ``beyond`` (wholly above), ``straddles`` it, or ``too few rounds``."""
        if self.coverage < MIN_COVERAGE:
            return "too few rounds"
        if self.high <= bound:
            return "within"
        if self.low > bound:
            return "beyond"
        return "straddles"

    def __str__(self) -> str:
        return self.describe()

    def describe(self, bound: float | None = None) -> str:
        """The median, interval and verdict: against 1 (faster / slower / tie), or against ``bound``."""
        verdict = self.verdict if bound is None else self.against(bound)
        if bound is not None and verdict != "too few rounds":
            verdict += f" {bound:g}×"
        return (f"paired per round: median {self.median:.3f}×, {self.coverage:.0%} interval "
                f"{self.low:.3f}–{self.high:.3f}× (n = {self.n}): {verdict}")


def sign_test_rank(n: int, level: float = 0.95) -> tuple[int, float]:
    """The largest ``k`` (1-based, at least 1) with ``[x_(k), x_(n+1-k)]`` covering the median with probability at
    least ``level``, and that probability (for ``k = 1`` it may fall short of ``level``)."""
    if n < 1:
        raise ValueError("no pairs")

    def coverage(k: int) -> float:
        tail = sum(math.comb(n, j) for j in range(k)) / 2 ** n  # P(Bin(n, 1/2) <= k - 1)
        return 1.0 - 2.0 * tail

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return k, coverage(k)


def paired_ratio(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedRatio:
    """Per-round ratios ``a[i] / b[i]`` (times of two methods in the same rounds): median and interval."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} times against {len(b)}: not the same rounds")
    ratios = sorted(x / y for x, y in zip(a, b))
    k, cov = sign_test_rank(len(ratios), level)
    return PairedRatio(statistics.median(ratios), ratios[k - 1], ratios[-k], cov, len(ratios))
