"""Verdicts with confidence: the finalists of a search (its best configs and the baseline)
measured again, interleaved (A B C A B C ...) so that the machine's drift falls on all of
them alike, until the best one's bootstrap interval of the median tokens/s separates from
every other's or the rounds run out. A single measurement on a shared machine moves 11-17%
between repeats (results/step_dataset), so a search's best single shot is partly luck
(the winner's curse): the figures reported are the medians of these re-measurements, and
pairs whose intervals overlap are called a tie."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap

__all__ = ["Verdict", "confirm", "finalists", "interval", "ratio_interval", "section",
           "verdicts"]

LEVEL = 0.95


def interval(samples: list[float], *, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median (scipy.stats.bootstrap); a single sample,
    or identical ones, is its own interval."""
    x = np.asarray(samples, float)
    if len(x) < 2 or np.ptp(x) == 0:
        return float(x.min()), float(x.max())
    res = bootstrap((x,), np.median, confidence_level=level, method="percentile",
                    n_resamples=2000, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def ratio_interval(a: list[float], b: list[float], *,
                   statistic: Callable[[np.ndarray], float] = np.mean, level: float = LEVEL,
                   seed: int = 0, resamples: int = 4000) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of statistic(a) / statistic(b), the two resampled
    independently; None with fewer than two samples on either side. The bounds are order
    statistics of the resampled ratios, never interpolated (scipy's bootstrap interpolates),
    so a statistic that is infinite on some resamples (a benchmark run that missed its
    target) makes an infinite bound instead of a NaN."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    if len(x) < 2 or len(y) < 2:
        return None
    rng = np.random.default_rng(seed)
    ratios = np.array([statistic(rng.choice(x, len(x))) / statistic(rng.choice(y, len(y)))
                       for _ in range(resamples)])
    tail = (1 - level) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


@dataclass(frozen=True)
class Verdict:
    name: str
    samples: tuple[float, ...]  # tokens/s of each re-measurement that completed
    median: float
    low: float
    high: float
    ties: tuple[str, ...]  # the finalists whose intervals overlap this one's

    def to_json_dict(self) -> dict:
        return {"samples": list(self.samples), "median": self.median, "low": self.low,
                "high": self.high, "ties": list(self.ties)}


def verdicts(samples: Mapping[str, list[float]], *, level: float = LEVEL) -> dict[str, Verdict]:
    """Each finalist's median and interval, best median first, and who it ties with."""
    iv = {n: interval(s, level=level) if s else (float("nan"), float("nan"))
          for n, s in samples.items()}

    def overlap(a: str, b: str) -> bool:
        return bool(samples[a]) and bool(samples[b]) and iv[a][0] <= iv[b][1] and iv[b][0] <= iv[a][1]

    order = sorted(samples, key=lambda n: -float(np.median(samples[n])) if samples[n] else np.inf)
    return {n: Verdict(n, tuple(samples[n]),
                       float(np.median(samples[n])) if samples[n] else float("nan"),
                       *iv[n], tuple(o for o in order if o != n and overlap(n, o)))
            for n in order}


def separated(samples: Mapping[str, list[float]], *, level: float = LEVEL) -> bool:
    """Whether the best finalist's interval overlaps no other's."""
    v = verdicts(samples, level=level)
    return not next(iter(v.values())).ties


def confirm(finalists: Mapping[str, object], measure: Callable[[str, object, int], float | None], *,
            min_rounds: int = 3, max_rounds: int = 5, level: float = LEVEL,
            on_round: Callable[[int], None] | None = None) -> dict[str, Verdict]:
    """Measure every finalist once per round, in the same order each round, for at least
    ``min_rounds`` and at most ``max_rounds`` rounds, stopping early once the best one's
    interval separates. ``measure(name, config, round)`` returns tokens/s, or None for a
    measurement that did not complete (left out of the samples)."""
    samples: dict[str, list[float]] = {n: [] for n in finalists}
    for r in range(max_rounds):
        for name, rc in finalists.items():
            got = measure(name, rc, r)
            if got is not None and np.isfinite(got):
                samples[name].append(float(got))
        if on_round is not None:
            on_round(r + 1)
        if r + 1 >= min_rounds and all(samples.values()) and separated(samples, level=level):
            break
    return verdicts(samples, level=level)


RUNNER_UP_WITHIN = 0.15  # a runner-up this close to the best single shot may be the better config


def finalists(ranked: list, baseline: object, baselines: Mapping[str, list] | None = None
              ) -> dict[str, object]:
    """The configs measured again: the search's best, its runner-up where the two single
    shots lie within the noise of one measurement (``RUNNER_UP_WITHIN``), the baseline, and
    each --baselines strategy's best. ``ranked``: the search's completed trials, best first
    (anything with ``.rc`` and ``.measurement.tokens_per_s``)."""
    from autotune.tune.study import config_key

    out: dict[str, object] = {}
    if ranked:
        out["tuned"] = ranked[0].rc
        best = ranked[0].measurement.tokens_per_s
        for t in ranked[1:]:
            if config_key(t.rc) != config_key(ranked[0].rc):
                if t.measurement.tokens_per_s >= (1 - RUNNER_UP_WITHIN) * best:
                    out["runner-up"] = t.rc
                break
    out["baseline"] = baseline
    for name, trials in (baselines or {}).items():
        ok = [t for t in trials if t.ok and t.measurement.tokens_per_s]
        if ok:
            out[f"baseline: {name}"] = max(ok, key=lambda t: t.measurement.tokens_per_s).rc
    return out


def section(found: Mapping[str, Verdict], configs: Mapping[str, object], tuned: str) -> str:
    """The report's section: each finalist's median and interval, ties named, and the tuned
    config's ratio to each other finalist with its interval."""
    t = found[tuned]
    lines = ["## Confirmed: the finalists measured again, interleaved", "",
             f"Each finalist measured once per round in the same order (A B C A B C ...), "
             f"at least 3 rounds, until the best one's {LEVEL:.0%} bootstrap interval of the "
             f"median overlapped no other's or the rounds ran out. The tuned figure is the "
             f"median of these measurements, not the search's best single shot.", "",
             "| finalist | config | runs | median tokens/s | 95% interval | tuned / this "
             "(interval) | verdict |",
             "|---|---|---:|---:|---|---|---|"]
    for name, v in found.items():
        if not v.samples:
            lines.append(f"| {name} | `{configs[name].label()}` | 0 | - | - | - | no run completed |")
            continue
        ratio = "1.00" if name == tuned else (
            f"{t.median / v.median:.2f}x ({t.low / v.high:.2f}-{t.high / v.low:.2f})")
        verdict = f"tie with {', '.join(v.ties)}" if v.ties else "separated"
        lines.append(f"| {name} | `{configs[name].label()}` | {len(v.samples)} | "
                     f"{v.median:,.0f} | {v.low:,.0f}-{v.high:,.0f} | {ratio} | {verdict} |")
    return "\n".join(lines) + "\n"
