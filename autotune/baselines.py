"""What the tuner is judged against, at the same measurement budget.

- ``deepspeed_style``: DeepSpeed's autotuner as it searches: data parallel over every device,
  the data scheduling and checkpointing left as the user had them, ZeRO stages in order and
  the micro-batch found by binary search (the largest that runs, then smaller ones while
  they gain at least 5%), stopping after 5 measurements without improvement.
- ``tpe_search``: Optuna's TPE on real measurements only, no cost model.
- ``random_search``: configs drawn uniformly from the valid space.

Every strategy measures through a ``Measurer``, which counts the strategy's distinct
measurements against its budget and answers a config measured before (by any strategy, or
before a resume) from its cache, so running the baselines beside the tuner costs only the
configs nobody measured yet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from autotune.config import RunConfig, SearchSpace
from autotune.propose import SpaceEncoding
from autotune.search import Trial, config_key
from profilers.records import Measurement

__all__ = ["BASELINES", "Measurer", "deepspeed_style", "random_search", "run_baseline",
           "tpe_search"]

Source = Callable[[RunConfig, int], Measurement]


class Measurer:
    """One strategy's measurements: at most ``budget`` distinct configs, each measured once
    across every strategy sharing ``cache``."""

    def __init__(self, source: Source, budget: int, cache: dict[str, Trial],
                 on_new: Callable[[Trial], None] | None = None) -> None:
        self.source, self.budget, self.cache, self.on_new = source, budget, cache, on_new
        self.trials: list[Trial] = []
        self._mine: set[str] = set()

    @property
    def exhausted(self) -> bool:
        return len(self.trials) >= self.budget

    def __call__(self, rc: RunConfig) -> Trial | None:
        """The measurement of ``rc`` (None once the budget is spent)."""
        key = config_key(rc)
        if key in self._mine:
            return next(t for t in self.trials if config_key(t.rc) == key)
        if self.exhausted:
            return None
        trial = self.cache.get(key)
        if trial is None:
            trial = Trial(len(self.cache), rc, self.source(rc, len(self.cache)))
            self.cache[key] = trial
            if self.on_new is not None:
                self.on_new(trial)
        self.trials.append(trial)
        self._mine.add(key)
        return trial


def _tokens(trial: Trial | None) -> float:
    ok = trial is not None and trial.ok and trial.measurement.tokens_per_s
    return float(trial.measurement.tokens_per_s) if ok else 0.0


def deepspeed_style(candidates: Sequence[RunConfig], measure: Measurer,
                    user: RunConfig) -> list[Trial]:
    """ZeRO stage x micro-batch search over ``user``'s config, as DeepSpeed's autotuner."""
    space = SearchSpace()
    base = space.canonical(user)
    world = base.parallel.world_size
    by_stage: dict[int, list[RunConfig]] = {}
    for rc in candidates:
        same = (rc.schedule.policy == base.schedule.policy and rc.parallel.dp == world
                and rc.checkpointing == base.checkpointing and rc.precision == base.precision
                and rc.kernels == base.kernels)
        if same:
            by_stage.setdefault(rc.parallel.zero_stage, []).append(rc)
    knob = "micro_batch_size" if base.schedule.policy in ("pad-batch", "pad-max", "sorted") \
        else "micro_batch_tokens"
    best, since_best = 0.0, 0
    for stage in sorted(by_stage):
        sizes = sorted(by_stage[stage], key=lambda rc: getattr(rc.schedule, knob))
        # the largest micro-batch that runs, by binary search
        lo, hi, largest = 0, len(sizes) - 1, -1
        while lo <= hi and not measure.exhausted:
            mid = (lo + hi) // 2
            if _tokens(measure(sizes[mid])) > 0:
                largest, lo = mid, mid + 1
            else:
                hi = mid - 1
        # then smaller ones while they gain at least 5%
        stage_best = 0.0
        for i in range(largest, -1, -1):
            if measure.exhausted or since_best >= 5:
                break
            got = _tokens(measure(sizes[i]))
            if got > best:
                best, since_best = got, 0
            else:
                since_best += 1
            if stage_best and got < 1.05 * stage_best:
                break
            stage_best = max(stage_best, got)
    return measure.trials


def random_search(candidates: Sequence[RunConfig], measure: Measurer, seed: int = 0) -> list[Trial]:
    for i in np.random.default_rng(seed).permutation(len(candidates)):
        if measure.exhausted:
            break
        measure(candidates[int(i)])
    return measure.trials


def tpe_search(candidates: Sequence[RunConfig], measure: Measurer, seed: int = 0,
               max_asks: int | None = None) -> list[Trial]:
    """Optuna TPE whose objective is the measured tokens/s (a failed run scores 0). Invalid
    combinations fail without a measurement; a config asked twice is told its first value."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    enc = SpaceEncoding(candidates)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    asks = 0
    while not measure.exhausted and asks < (max_asks or 200 * measure.budget):
        asks += 1
        trial = study.ask()
        rc = enc.suggest(trial)
        if rc is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        study.tell(trial, _tokens(measure(rc)))
    return measure.trials


BASELINES: dict[str, str] = {
    "deepspeed-style": "DeepSpeed-autotuner style: data parallel, your scheduling, ZeRO "
                       "stage x micro-batch binary search, measured",
    "tpe-measured": "Optuna TPE on real measurements, no cost model",
    "random": "random configs of the valid space",
}


def run_baseline(name: str, candidates: Sequence[RunConfig], measure: Measurer,
                 user: RunConfig, seed: int = 0) -> list[Trial]:
    if name == "deepspeed-style":
        return deepspeed_style(candidates, measure, user)
    if name == "tpe-measured":
        return tpe_search(candidates, measure, seed)
    if name == "random":
        return random_search(candidates, measure, seed)
    raise ValueError(f"unknown baseline {name!r}")
