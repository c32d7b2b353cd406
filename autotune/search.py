"""Cost-model-guided search, verified by measurements.

Every valid candidate of the space is priced by the step model (the whole space: at about
0.4 ms a candidate, exact pricing beats sampling it); the best predicted candidates that fit
the memory cap with a margin are measured for real, a few at a time; each round's
measurements refit the step calibration and the memory model, and the next round re-ranks.
The answer is the best *measured* candidate.

Measured trials are kept in an Optuna study (SQLite by default, any RDB URL), one trial per
measurement with the config and the measurement as attributes, so a killed run resumes
without repeating or losing a completed measurement, and optuna-dashboard can watch it.
Measurements come from a source: the real trainer (``LiveSource``) or a recorded table
(``ReplaySource``, Kernel Tuner's simulation mode) for tests and benchmarks in seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.calibrate import canary_drift
from autotune.config import RunConfig, Workload
from autotune.errors import StorageFailure, UserError
from autotune.predict import StepPredictor
from cost_models.bundle import StepModels
from cost_models.step import MemoryModel, ResidualModel
from profilers.records import Measurement, Status

__all__ = ["MEMORY_MARGIN", "Ranker", "ReplaySource", "Trial", "TrialLog", "config_key",
           "guided_search", "memory_limit", "storage_errors"]


def config_key(rc: RunConfig) -> str:
    """One spelling per config, stable across processes."""
    return rc.model_dump_json()


@dataclass
class Trial:
    n: int
    rc: RunConfig
    measurement: Measurement
    predicted_tokens_per_s: float | None = None
    predicted_peak_mem_bytes: float | None = None

    @property
    def ok(self) -> bool:
        return self.measurement.status is Status.COMPLETE


class ReplaySource:
    """Measurements answered from recorded tables (``config_json`` + ``measurement_json``
    columns, as ``suites.step_dataset`` writes them); a config not in them is a CRASHED
    measurement saying so."""

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.repeats: dict[str, list[Measurement]] = {}  # per config, in the table's order
        for path in map(Path, paths):
            try:
                frame = pd.read_parquet(path)
            except (OSError, ValueError) as exc:
                raise UserError(f"--replay {path}: not a measurements table ({exc})") from None
            for rec in frame.itertuples():
                key = config_key(RunConfig.model_validate_json(rec.config_json))
                self.repeats.setdefault(key, []).append(
                    Measurement.model_validate_json(rec.measurement_json))

    @property
    def table(self) -> dict[str, Measurement]:
        """The last recorded measurement of each config."""
        return {key: got[-1] for key, got in self.repeats.items()}

    def again(self, rc: RunConfig, r: int) -> Measurement:
        """The config measured again, the r-th time: its recorded measurements in turn."""
        got = self.repeats.get(config_key(rc))
        if not got:
            return Measurement(status=Status.CRASHED, reason="not in the replay table")
        return got[r % len(got)]

    def __call__(self, rc: RunConfig, n: int) -> Measurement:
        # Reliability tests stretch a replayed measurement to kill the run in the middle of one.
        delay = float(os.environ.get("AUTOTUNE_REPLAY_DELAY_S", "0") or 0)
        if delay:
            time.sleep(delay)
        return self.again(rc, -1)  # the last recorded one


@contextmanager
def storage_errors(storage: str, doing: str) -> Iterator[None]:
    """A storage failing mid-run (SQLite on a full disk, a PostgreSQL server gone) as one
    StorageFailure line instead of SQLAlchemy's traceback."""
    import optuna
    import sqlalchemy.exc

    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
        cause = exc.__cause__ or exc
        detail = (str(cause).splitlines() or [type(cause).__name__])[0]
        raise StorageFailure(f"{doing} in {_without_password(storage)}: {detail}; what was "
                             f"recorded before is kept, and the same command resumes") from None


def _without_password(url: str) -> str:
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL we cannot parse is shown as given
        return url


class TrialLog:
    """Measured trials in an Optuna study: ``add`` writes one as soon as it completes,
    ``trials`` reads them back (on resume)."""

    def __init__(self, storage: str, study_name: str = "measured") -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = storage
        try:
            self.study = optuna.create_study(storage=storage, study_name=study_name,
                                             direction="maximize", load_if_exists=True)
        except Exception as exc:  # noqa: BLE001 - any storage failure is bad input here
            raise UserError(f"--storage {storage}: cannot open the study ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None

    def trials(self) -> list[Trial]:
        out = []
        with storage_errors(self.storage, "cannot read the measured trials"):
            stored = self.study.get_trials(deepcopy=False)
        for t in stored:
            attrs = t.user_attrs
            if "config_json" not in attrs:
                continue
            out.append(Trial(int(attrs["n"]), RunConfig.model_validate_json(attrs["config_json"]),
                             Measurement.model_validate_json(attrs["measurement_json"]),
                             attrs.get("predicted_tokens_per_s"), attrs.get("predicted_peak_mem_bytes")))
        return sorted(out, key=lambda t: t.n)

    def add(self, trial: Trial) -> None:
        import optuna

        m = trial.measurement
        ok = trial.ok and m.tokens_per_s is not None
        # The space's knobs vary by policy, which Optuna's fixed distributions cannot hold;
        # the config rides along as attributes, its label for the dashboard.
        frozen = optuna.trial.create_trial(
            params={}, distributions={},
            value=float(m.tokens_per_s) if ok else None,
            state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
            user_attrs={"n": trial.n, "config": trial.rc.label(),
                        "config_json": trial.rc.model_dump_json(),
                        "measurement_json": m.model_dump_json(), "status": m.status.value,
                        "predicted_tokens_per_s": trial.predicted_tokens_per_s,
                        "predicted_peak_mem_bytes": trial.predicted_peak_mem_bytes})
        with storage_errors(self.storage, f"cannot record trial {trial.n}"):
            self.study.add_trial(frozen)


def _measured_table(trials: Sequence[Trial], index: dict[str, int]) -> pd.DataFrame:
    """COMPLETE trials as the calibration reads them, indexed by candidate position."""
    rows = {}
    for t in trials:
        if not t.ok or config_key(t.rc) not in index or not t.measurement.step_times_s:
            continue
        drift = canary_drift(t.measurement.extra)
        rows[index[config_key(t.rc)]] = {
            "step_mean_s": float(np.mean(t.measurement.step_times_s)) / drift,
            "peak_mem_bytes": float(t.measurement.peak_mem_bytes or np.nan)}
    return pd.DataFrame.from_dict(rows, orient="index")


# Candidates must fit the memory cap with this share of it to spare: predictions err.
MEMORY_MARGIN = 0.1


def memory_limit(workload: Workload, margin: float = MEMORY_MARGIN) -> float:
    """Bytes a candidate's predicted peak per device may reach: the cap less the margin."""
    return workload.budget.memory_cap_gb * 2**30 * (1 - margin)


class Ranker:
    """The search's ranking: every candidate priced by the step model, recalibrated on the
    measurements so far; ``picks`` are the untried candidates that fit the memory cap with
    ``margin`` to spare, best predicted first. Shared by ``guided_search`` and the scale-out
    workers (``autotune.scaleout``), so both measure in the same order."""

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

    def picks(self, trials: Sequence[Trial], exclude: Iterable[str] = ()
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
        skip = {config_key(t.rc) for t in trials} | set(exclude)
        order = [int(i) for i in np.argsort(-tokens)
                 if fits[i] and config_key(self.candidates[i]) not in skip]
        return order, tokens, peak


def guided_search(candidates: Sequence[RunConfig], models: StepModels,
                  source: Callable[[RunConfig, int], Measurement], *, budget: int,
                  batch: int = 3, margin: float = MEMORY_MARGIN, done: Sequence[Trial] = (),
                  on_trial: Callable[[Trial], None] | None = None,
                  warmup: int = 1, steps: int = 3, deadline: float | None = None) -> list[Trial]:
    """Measure up to ``budget`` candidates (counting ``done``), best predicted first, each
    round re-ranked by a calibration refitted on every measurement so far; no measurement
    starts after ``deadline`` (``time.monotonic()``)."""
    ranker = Ranker(candidates, models, warmup=warmup, steps=steps, margin=margin)
    trials = list(done)
    while len(trials) < budget and (deadline is None or time.monotonic() < deadline):
        picks, tokens, peak = ranker.picks(trials)
        if not picks:
            break
        for i in picks[:min(batch, budget - len(trials))]:
            if deadline is not None and time.monotonic() >= deadline:
                break
            rc = candidates[i]
            trial = Trial(len(trials), rc, source(rc, len(trials)), float(tokens[i]), float(peak[i]))
            trials.append(trial)
            if on_trial is not None:
                on_trial(trial)
    return trials
