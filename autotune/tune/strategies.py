"""Every search the tuner runs or is judged against, behind one interface: a ``Strategy``
is asked for the configs it wants measured next, given the trials it has had, and told each
result. ``drive`` runs one against a measurement budget.

- ``guided``: every candidate priced by the step model; the best predicted that fit the
  memory cap with a margin are measured a few at a time, and each round's measurements
  refit the calibration and the memory model before the next round re-ranks.
- ``pareto``: the predicted throughput/memory front measured at evenly spaced points.
- ``tpe-predicted``: Optuna's TPE on the step model's predictions proposes the configs,
  measured in its order (for spaces too large to price whole).
- ``deepspeed-style``: DeepSpeed's autotuner as it searches: data parallel over every
  device, the data scheduling and checkpointing left as the user had them, ZeRO stages in
  order and the micro-batch found by binary search (the largest that runs, then smaller
  ones while they gain at least 5%), stopping after 5 measurements without improvement.
- ``tpe-measured``: Optuna's TPE on real measurements only, no cost model.
- ``random``: configs drawn uniformly from the valid space.

A strategy is a deterministic function of its seed and the results it is told, so a run
killed and started again replays it, each config it had measured answered by the study
(``Recorded``) instead of measured again.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Generator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import pandas as pd

from autotune.config import PADDED_POLICIES, RunConfig, SearchSpace, Workload
from autotune.errors import UserError
from autotune.predict import StepPredictor
from autotune.tune.sources import Recorded
from autotune.tune.study import Pick, Trial, config_key
from cost_models.bundle import StepModels
from cost_models.step import MemoryModel, ResidualModel
from profilers.records import Status

__all__ = ["BASELINES", "MEMORY_MARGIN", "STRATEGIES", "Context", "Ranker", "Strategy",
           "drive", "make", "memory_limit"]

# Candidates must fit the memory cap with this share of it to spare: predictions err.
MEMORY_MARGIN = 0.1


def memory_limit(workload: Workload, margin: float = MEMORY_MARGIN) -> float:
    """Bytes a candidate's predicted peak per device may reach: the cap less the margin."""
    return workload.budget.memory_cap_gb * 2**30 * (1 - margin)


@dataclass(frozen=True)
class Context:
    """What a strategy may know: the candidates, the models pricing them, the user's own
    config (or the untuned baseline), its seed and budget."""

    candidates: Sequence[RunConfig]
    models: StepModels | None = None
    user: RunConfig | None = None
    seed: int = 0
    budget: int = 20
    batch: int = 3
    warmup: int = 1
    steps: int = 3
    predicted_trials: int = 3000

    def predictor(self) -> StepPredictor:
        if self.models is None:
            raise ValueError("this strategy prices configs: its context needs models")
        return StepPredictor(self.models, warmup=self.warmup, steps=self.steps)


class Strategy(Protocol):
    name: ClassVar[str]
    about: ClassVar[str]

    def ask(self, history: Sequence[Trial], taken: Collection[str] = ()) -> list[Pick]:
        """The configs to measure next, best first, none in ``history`` (the trials this
        strategy has had) nor in ``taken`` (config keys another worker is measuring);
        empty when it wants nothing more."""
        ...

    def tell(self, trial: Trial) -> None:
        """The result of one of the configs it asked for."""
        ...


def _measured_table(trials: Sequence[Trial], index: dict[str, int]) -> pd.DataFrame:
    """COMPLETE trials as the calibration reads them, indexed by candidate position, at the
    machine's reference speed (the canary matmul timed around each measurement)."""
    rows = {}
    for t in trials:
        if not t.ok or t.key not in index or not t.measurement.step_times_s:
            continue
        rows[index[t.key]] = {
            "step_mean_s": float(np.mean(t.measurement.step_times_s)) / t.measurement.drift,
            "peak_mem_bytes": float(t.measurement.peak_mem_bytes or np.nan)}
    return pd.DataFrame.from_dict(rows, orient="index")


class Ranker:
    """Every candidate priced by the step model, recalibrated on the measurements so far;
    ``picks`` are the untried candidates that fit the memory cap with ``margin`` to spare,
    best predicted first."""

    def __init__(self, candidates: Sequence[RunConfig], models: StepModels, *,
                 warmup: int = 1, steps: int = 3, margin: float = MEMORY_MARGIN) -> None:
        if not candidates:
            raise UserError("the search space holds no valid candidate for this workload")
        self.candidates, self.models, self.margin = list(candidates), models, margin
        predictor = StepPredictor(models, warmup=warmup, steps=steps)
        self.comp, unit_arrays = predictor.compose(self.candidates)
        self.units = StepPredictor.unit_frame(unit_arrays)
        self.index = {config_key(rc): i for i, rc in enumerate(self.candidates)}
        self.limit = np.array([memory_limit(rc.workload, margin) for rc in self.candidates])

    def picks(self, trials: Sequence[Trial], exclude: Collection[str] = ()
              ) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Candidate positions to measure next, best first, none tried in ``trials`` nor
        in ``exclude`` (config keys); with every candidate's predicted tokens/s and peak."""
        models, comp, units = self.models, self.comp, self.units
        table = _measured_table(trials, self.index)
        residual, memory = models.residual, models.memory
        if len(table) >= ResidualModel.MIN_LINEAR:
            sel = table.index.to_numpy()
            residual = ResidualModel.fit(comp.loc[sel], table.step_mean_s.to_numpy(), models.fingerprint)
            mem_ok = table.peak_mem_bytes.notna()
            if mem_ok.sum() >= ResidualModel.MIN_LINEAR:
                memory = MemoryModel.fit(units[units.config.isin(sel[mem_ok.to_numpy()])],
                                         table.peak_mem_bytes[mem_ok], models.fingerprint)
        step_s = residual.predict(comp)
        tokens = comp.tokens_per_step.to_numpy() / step_s
        peak = memory.peak(units).reindex(range(len(self.candidates))).to_numpy()
        fits = peak <= self.limit
        skip = {t.key for t in trials} | set(exclude)
        order = [int(i) for i in np.argsort(-tokens)
                 if fits[i] and config_key(self.candidates[i]) not in skip]
        # Last, not left out: the bound is a guess, and a search must not end with budget
        # left because of it.
        bound = self._oom_bound(trials, peak)
        return [i for i in order if peak[i] < bound] + [i for i in order if peak[i] >= bound], \
            tokens, peak


    def _oom_bound(self, trials: Sequence[Trial], peak: np.ndarray) -> float:
        """The least peak the model now predicts for a config that ran out of memory: one
        predicted to need as much is likely to run out too, and is tried last. The memory
        model is fitted on completed trials only, so without this an OOM teaches the search
        nothing."""
        oom = [self.index[t.key] for t in trials
               if t.measurement.status is Status.OOM and t.key in self.index]
        return float(peak[oom].min()) if oom else np.inf


class Guided:
    name, about = "guided", "autotune's cost-model-guided search, recalibrated every round"

    def __init__(self, ctx: Context) -> None:
        self.ranker = Ranker(ctx.candidates, ctx.models, warmup=ctx.warmup, steps=ctx.steps)
        self.batch = ctx.batch

    def ask(self, history: Sequence[Trial], taken: Collection[str] = ()) -> list[Pick]:
        picks, tokens, peak = self.ranker.picks(history, exclude=taken)
        return [Pick(self.ranker.candidates[i], float(tokens[i]), float(peak[i]))
                for i in picks[:self.batch]]

    def tell(self, trial: Trial) -> None:
        """Nothing to keep: the next ``ask`` recalibrates on the whole history."""


class _Ordered:
    """A strategy whose order is fixed before the first measurement."""

    order: list[Pick]

    def ask(self, history: Sequence[Trial], taken: Collection[str] = ()) -> list[Pick]:
        skip = {t.key for t in history} | set(taken)
        return [p for p in self.order if config_key(p.rc) not in skip][:1]

    def tell(self, trial: Trial) -> None:
        """The order does not depend on the results."""


class Pareto(_Ordered):
    name, about = "pareto", "the predicted throughput/memory front, measured at even spacing"

    def __init__(self, ctx: Context) -> None:
        from autotune.propose import pareto_front

        pred = ctx.predictor().predict_many(list(ctx.candidates))
        front = pareto_front(list(zip(pred.tokens_per_s, pred.peak_mem_bytes, strict=True)))
        spaced = [front[int(round(i))]
                  for i in np.linspace(0, len(front) - 1, min(ctx.budget, len(front)))]
        rest = [i for i in range(len(ctx.candidates)) if i not in set(spaced)]
        self.order = [Pick(ctx.candidates[i], float(pred.tokens_per_s[i]),
                           float(pred.peak_mem_bytes[i])) for i in dict.fromkeys(spaced + rest)]


class TPEPredicted(_Ordered):
    name, about = "tpe-predicted", "Optuna TPE on the step model's predictions, measured in its order"

    def __init__(self, ctx: Context) -> None:
        from autotune.propose import SpaceEncoding, propose

        wl = ctx.candidates[0].workload
        predictor = ctx.predictor()
        got = propose(SpaceEncoding(ctx.candidates), predictor, trials=ctx.predicted_trials,
                      keep=max(ctx.budget, 50), cap_bytes=wl.budget.memory_cap_gb * 2**30,
                      seed=ctx.seed)
        pred = predictor.predict_many(got) if got else None
        self.order = [Pick(rc, float(pred.tokens_per_s[i]), float(pred.peak_mem_bytes[i]))
                      for i, rc in enumerate(got)]


def _tokens(trial: Trial | None) -> float:
    ok = trial is not None and trial.ok and trial.measurement.tokens_per_s
    return float(trial.measurement.tokens_per_s) if ok else 0.0


class _Sequential:
    """A strategy written as a generator that yields one config at a time and is sent its
    result: searches whose next config depends on the last one's outcome."""

    def __init__(self, plan: Generator[RunConfig, Trial, None]) -> None:
        self._plan = plan
        self._next: RunConfig | None = next(plan, None)

    def ask(self, history: Sequence[Trial], taken: Collection[str] = ()) -> list[Pick]:
        return [] if self._next is None else [Pick(self._next)]

    def tell(self, trial: Trial) -> None:
        try:
            self._next = self._plan.send(trial)
        except StopIteration:
            self._next = None


class DeepSpeedStyle(_Sequential):
    name = "deepspeed-style"
    about = ("DeepSpeed-autotuner style: data parallel, your scheduling, ZeRO stage x "
             "micro-batch binary search, measured")

    def __init__(self, ctx: Context) -> None:
        if ctx.user is None:
            raise ValueError("the DeepSpeed-style search starts from the user's config")
        self.candidates, self.user = ctx.candidates, ctx.user
        super().__init__(self.plan())

    def plan(self) -> Generator[RunConfig, Trial, None]:
        base = SearchSpace().canonical(self.user)
        world = base.parallel.world_size
        by_stage: dict[int, list[RunConfig]] = {}
        for rc in self.candidates:
            same = (rc.schedule.policy == base.schedule.policy and rc.parallel.dp == world
                    and rc.checkpointing == base.checkpointing and rc.precision == base.precision
                    and rc.kernels == base.kernels)
            if same:
                by_stage.setdefault(rc.parallel.zero_stage, []).append(rc)
        knob = "micro_batch_size" if base.schedule.policy in PADDED_POLICIES \
            else "micro_batch_tokens"
        best, since_best = 0.0, 0
        for stage in sorted(by_stage):
            sizes = sorted(by_stage[stage], key=lambda rc: getattr(rc.schedule, knob))
            # the largest micro-batch that runs, by binary search
            lo, hi, largest = 0, len(sizes) - 1, -1
            while lo <= hi:
                mid = (lo + hi) // 2
                if _tokens((yield sizes[mid])) > 0:
                    largest, lo = mid, mid + 1
                else:
                    hi = mid - 1
            # then smaller ones while they gain at least 5%
            stage_best = 0.0
            for i in range(largest, -1, -1):
                if since_best >= 5:
                    break
                got = _tokens((yield sizes[i]))
                if got > best:
                    best, since_best = got, 0
                else:
                    since_best += 1
                if stage_best and got < 1.05 * stage_best:
                    break
                stage_best = max(stage_best, got)


class TPEMeasured(_Sequential):
    name, about = "tpe-measured", "Optuna TPE on real measurements, no cost model"

    def __init__(self, ctx: Context, max_asks: int | None = None) -> None:
        self.candidates, self.seed = ctx.candidates, ctx.seed
        self.max_asks = max_asks or 200 * ctx.budget
        super().__init__(self.plan())

    def plan(self) -> Generator[RunConfig, Trial, None]:
        """Invalid combinations fail without a measurement; a config asked twice is told
        its first value (the driver answers it from the history)."""
        import optuna

        from autotune.propose import SpaceEncoding

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        enc = SpaceEncoding(self.candidates)
        study = optuna.create_study(direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=self.seed))
        for _ in range(self.max_asks):
            trial = study.ask()
            rc = enc.suggest(trial)
            if rc is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            study.tell(trial, _tokens((yield rc)))


class Random(_Sequential):
    name, about = "random", "random configs of the valid space"

    def __init__(self, ctx: Context) -> None:
        self.candidates, self.seed = ctx.candidates, ctx.seed
        super().__init__(self.plan())

    def plan(self) -> Generator[RunConfig, Trial, None]:
        for i in np.random.default_rng(self.seed).permutation(len(self.candidates)):
            yield self.candidates[int(i)]


STRATEGIES: dict[str, type] = {s.name: s for s in (Guided, Pareto, TPEPredicted, DeepSpeedStyle,
                                                    TPEMeasured, Random)}
# What `autotune run --baselines` and the tuner benchmark judge the tuner against.
BASELINES: dict[str, str] = {name: STRATEGIES[name].about
                             for name in ("deepspeed-style", "tpe-measured", "random")}


def make(name: str, ctx: Context) -> Strategy:
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](ctx)


def drive(strategy: Strategy, measure: Recorded, *, budget: int,
          history: Sequence[Trial] = (), deadline: float | None = None) -> list[Trial]:
    """Run ``strategy`` until it has had ``budget`` distinct configs (``history`` counting),
    it wants nothing more, or ``deadline`` (``time.monotonic()``) passes; no measurement
    starts after the deadline. Returns its trials in the order it had them."""
    trials = list(history)
    had = {t.key: t for t in trials}

    def late() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    while len(trials) < budget and not late():
        picks = strategy.ask(trials)
        if not picks:
            break
        for pick in picks[:budget - len(trials)]:
            if late():
                break
            key = config_key(pick.rc)
            if key not in had:
                had[key] = measure(pick)
                trials.append(had[key])
            strategy.tell(had[key])
    return trials
