"""Verdicts with confidence: bootstrap intervals of the median against a hand-checked case,
a tie for the same machine twice, a separation for machines far apart, and interleaving."""

from __future__ import annotations

import numpy as np
import pytest

from autotune.tune.verdict import confirm, interval, ratio_interval, verdicts


def test_interval_brackets_the_median_and_narrows_with_samples() -> None:
    rng = np.random.default_rng(1)
    few, many = rng.normal(100, 10, 5), rng.normal(100, 10, 200)
    lo5, hi5 = interval(list(few))
    lo, hi = interval(list(many))
    assert lo5 <= np.median(few) <= hi5 and lo <= np.median(many) <= hi
    assert hi - lo < hi5 - lo5
    # 200 draws of N(100, 10): the median's standard error is about 1.25 x 10 / sqrt(200)
    # = 0.89, so a 95% interval is about +-1.7 wide around the sample median
    assert 2.0 < hi - lo < 5.5 and lo < 100 < hi
    assert interval([7.0]) == (7.0, 7.0) and interval([3.0, 3.0]) == (3.0, 3.0)


def _noisy(mean: dict[str, float], spread: float, seed: int = 0):  # noqa: ANN202
    """A machine measuring each config at its mean tokens/s times a shared drift and its own
    noise, logging the order it was asked in."""
    rng = np.random.default_rng(seed)
    asked: list[str] = []

    def measure(name: str, rc: str, r: int) -> float:
        asked.append(rc)
        return mean[rc] * rng.normal(1.0, spread)

    return measure, asked


def test_the_same_config_under_two_names_is_a_tie() -> None:
    measure, asked = _noisy({"A": 5000.0}, 0.12)
    out = confirm({"tuned": "A", "same again": "A"}, measure, min_rounds=3, max_rounds=6)
    assert out["tuned"].ties == ("same again",) and out["same again"].ties == ("tuned",)
    assert len(out["tuned"].samples) == 6  # never separated: every round spent
    assert asked == ["A"] * 12


def test_configs_far_apart_separate_early_and_interleave() -> None:
    measure, asked = _noisy({"fast": 8000.0, "slow": 4000.0, "baseline": 2000.0}, 0.05)
    out = confirm({"fast": "fast", "slow": "slow", "baseline": "baseline"}, measure,
                  min_rounds=3, max_rounds=8)
    assert list(out) == ["fast", "slow", "baseline"]
    assert out["fast"].ties == () and len(out["fast"].samples) == 3  # stopped at min_rounds
    assert asked == ["fast", "slow", "baseline"] * 3  # A B C A B C ...
    assert out["fast"].low > out["slow"].high


def test_a_failed_measurement_is_left_out() -> None:
    calls = iter([None, 100.0, 101.0, 99.0, 100.5, 98.0])
    out = confirm({"a": 1, "b": 2}, lambda name, rc, r: next(calls), min_rounds=3, max_rounds=3)
    assert len(out["a"].samples) == 2 and len(out["b"].samples) == 3


def test_verdicts_order_by_median() -> None:
    v = verdicts({"x": [1.0, 2.0, 3.0], "y": [10.0, 11.0, 12.0]})
    assert list(v) == ["y", "x"] and v["y"].median == pytest.approx(11.0)
    assert v["y"].ties == () and v["x"].ties == ()


def test_ratio_interval_matches_scipys_bootstrap() -> None:
    """The speedup's interval against scipy.stats.bootstrap's percentile interval of the
    same ratio of means (the two samples resampled independently): within 2%."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    slow, fast = rng.normal(120, 12, 8), rng.normal(100, 10, 6)
    got = ratio_interval(list(slow), list(fast))
    ref = bootstrap((slow, fast), lambda u, v, axis=-1: u.mean(axis) / v.mean(axis),
                    method="percentile", n_resamples=20_000, vectorized=True,
                    rng=np.random.default_rng(4)).confidence_interval
    assert got is not None and got == pytest.approx((ref.low, ref.high), rel=0.02)
    assert got[0] < slow.mean() / fast.mean() < got[1]
    assert ratio_interval([1.0], [1.0, 2.0]) is None  # nothing to resample on one side


def test_a_statistic_infinite_on_some_resamples_bounds_at_infinity() -> None:
    """A contender that missed its target in one run of three: resamples that keep it twice
    score infinity, so the upper bound is infinite, not NaN."""
    def worst(t: np.ndarray) -> float:
        return float(np.max(t))

    low, high = ratio_interval([10.0, 11.0, np.inf], [5.0, 5.5, 6.0], statistic=worst)
    assert np.isfinite(low) and high == np.inf
