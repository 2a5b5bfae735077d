"""The paired timing statistic of the benchmarks (benchmarks/timing_stats.py) against its definition."""

from __future__ import annotations

import importlib.util
import itertools
import math
import pathlib
import sys

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_stats", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "timing_stats.py")
stats = importlib.util.module_from_spec(_spec)
sys.modules["bench_stats"] = stats  # dataclasses look their module up
_spec.loader.exec_module(stats)


def _coverage_by_enumeration(n: int, k: int) -> float:
    """P(x_(k) <= median < x_(n+1-k)) counted over all 2^n sign patterns (each sample below or above it)."""
    hits = 0
    for signs in itertools.product((0, 1), repeat=n):
        below = sum(signs)  # samples under the median
        hits += k <= below <= n - k
    return hits / 2 ** n


@pytest.mark.parametrize("n", [1, 2, 5, 6, 9, 15, 21])
def test_sign_test_rank_matches_enumeration(n):
    k, cov = stats.sign_test_rank(n)
    assert cov == pytest.approx(_coverage_by_enumeration(n, k), abs=1e-12)
    if cov >= 0.95 and k + 1 <= (n + 1) // 2:
        assert _coverage_by_enumeration(n, k + 1) < 0.95  # k is the largest that keeps the level
    if n >= 6:
        assert cov >= 0.95


def test_known_ranks():
    # tables of the sign-test interval: n = 9 -> 2nd and 8th values (96.1 %), n = 5 -> the range (93.75 %)
    assert stats.sign_test_rank(9) == (2, pytest.approx(1 - 2 * 10 / 512))
    assert stats.sign_test_rank(5) == (1, pytest.approx(1 - 2 / 32))
    assert stats.sign_test_rank(15)[0] == 4


def test_paired_ratio_pairs_rounds_and_decides():
    a = [1.0, 2.0, 1.5, 3.0, 1.2, 2.2, 0.9, 1.1, 2.5]
    b = [x * f for x, f in zip(a, [1.10, 1.05, 1.20, 1.08, 1.15, 1.09, 1.12, 1.07, 1.11])]
    r = stats.paired_ratio(a, b)
    ratios = sorted(x / y for x, y in zip(a, b))
    assert r.n == 9 and r.median == pytest.approx(ratios[4])
    assert (r.low, r.high) == (pytest.approx(ratios[1]), pytest.approx(ratios[7]))
    assert r.verdict == "faster" and "faster" in str(r)
    assert stats.paired_ratio(b, a).verdict == "slower"
    mixed = stats.paired_ratio([1, 1, 1, 1, 1, 1], [0.9, 1.1, 0.95, 1.05, 1.0, 0.98])
    assert mixed.verdict == "tie" and mixed.low < 1 < mixed.high
    assert math.isclose(mixed.coverage, 1 - 2 / 64)  # n = 6: only the range reaches 95 %


def test_no_verdict_from_too_few_rounds():
    assert stats.paired_ratio([1.0] * 4, [2.0] * 4).verdict == "too few rounds"  # 87.5 % coverage at best
    assert stats.paired_ratio([1.0] * 5, [2.0] * 5).verdict == "faster"


def test_paired_ratio_rejects_unpaired():
    with pytest.raises(ValueError, match="same rounds"):
        stats.paired_ratio([1.0, 2.0], [1.0])


def test_paired_ratio_against_a_target():
    """Against a target ratio (ours ≤ 1.5× the floor): the interval wholly at or below it, above it, or across."""
    floor = [1.0, 1.1, 0.9, 1.0, 1.2, 1.0, 0.95]
    within = stats.paired_ratio([1.4 * f for f in floor], floor)
    assert within.against(1.5) == "within" and "within 1.5×" in within.describe(1.5)
    assert stats.paired_ratio([1.6 * f for f in floor], floor).against(1.5) == "beyond"
    across = stats.paired_ratio([r * f for r, f in zip([1.4, 1.6, 1.45, 1.55, 1.4, 1.6, 1.5], floor)], floor)
    assert across.against(1.5) == "straddles" and across.low < 1.5 < across.high
    assert stats.paired_ratio([1.0] * 4, [1.0] * 4).against(1.5) == "too few rounds"
    assert str(within) == within.describe()  # against 1 by default: the "faster than" verdicts
