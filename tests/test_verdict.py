"""Verdicts with confidence: bootstrap intervals of the median against a hand-checked case,
a tie for the same machine twice, a separation for machines far apart, and interleaving."""

from __future__ import annotations

import numpy as np
import pytest

from autotune.verdict import confirm, interval, verdicts


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
