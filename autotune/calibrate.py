"""Real measurements into the step model: loading ``autotune measure`` records, fitting the
step residual and the memory model on them, and judging the whole step model on configs it
was not fitted on (k-fold by config, never by rows of one config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import RunConfig
from autotune.errors import UserError
from autotune.predict import StepPredictor
from cost_models.bundle import StepModels
from cost_models.step import MemoryModel, ResidualModel
from profilers.records import Measurement

__all__ = ["compose_measured", "cross_validate", "fit_calibration", "load_measurements",
           "score"]


def _record(config_json: str, m: Measurement, source: str, scale_drift: bool = True) -> dict:
    steps = m.step_times_s
    drift = m.drift if scale_drift else 1.0
    return {"source": source, "config_json": config_json, "status": m.status.value,
            "tokens_per_s": m.tokens_per_s * drift if m.tokens_per_s else np.nan,
            "peak_mem_bytes": m.peak_mem_bytes, "drift": drift,
            "step_mean_s": float(np.mean(steps)) / drift if steps else np.nan,
            "tokens_per_step": m.extra.get("tokens_per_step"), "warmup": m.warmup_steps,
            "steps": m.timed_steps or len(steps)}


def load_measurements(paths: Iterable[str | Path], scale_drift: bool = True) -> pd.DataFrame:
    """COMPLETE measurements from measurement tables (``suites.step_dataset``'s parquet)
    and from ``autotune measure --out`` folders (``config.yaml`` + ``metrics.json``, searched
    recursively). One row per measurement."""
    from autotune.config import load_yaml

    rows = []
    for path in map(Path, paths):
        if path.is_file() and path.suffix == ".parquet":
            try:
                table = pd.read_parquet(path)
            except Exception as exc:  # pyarrow raises several unrelated types for a bad file
                raise UserError(f"{path}: not a readable parquet file "
                                f"({type(exc).__name__})") from None
            missing = {"config_json", "measurement_json"} - set(table.columns)
            if missing:
                raise UserError(f"{path}: not a measurements table (no column "
                                f"{', '.join(sorted(missing))}); write one with "
                                f"suites.step_dataset")
            for rec in table.itertuples():
                rows.append(_record(rec.config_json,
                                    Measurement.model_validate_json(rec.measurement_json),
                                    str(path), scale_drift))
        elif path.is_dir():
            for metrics in sorted(path.rglob("metrics.json")):
                config = metrics.with_name("config.yaml")
                if not config.exists():
                    continue
                rc = load_yaml(RunConfig, config)
                rows.append(_record(rc.model_dump_json(),
                                    Measurement.model_validate_json(metrics.read_text()),
                                    str(metrics.parent), scale_drift))
        else:
            raise UserError(f"{path}: not a measurements .parquet file or a folder of "
                            f"`autotune measure --out` records")
    table = pd.DataFrame(rows)
    if table.empty:
        raise UserError(f"no measurements found in {', '.join(map(str, paths))}")
    table = table[table.status == "COMPLETE"].copy()
    # one spelling per config, whatever schema version wrote the record
    table["config_json"] = [RunConfig.model_validate_json(j).model_dump_json()
                            for j in table.config_json]
    # A config measured more than once is one config: its mean step (and throughput over
    # it) and its largest peak, so that no fold split ever separates its measurements.
    group = table.groupby(["config_json", "warmup", "steps"], sort=False)
    out = group.agg(source=("source", "first"), status=("status", "first"),
                    step_mean_s=("step_mean_s", "mean"), peak_mem_bytes=("peak_mem_bytes", "max"),
                    tokens_per_step=("tokens_per_step", "mean"), drift=("drift", "mean"),
                    measurements=("status", "size")).reset_index()
    out["tokens_per_s"] = out["tokens_per_step"] / out["step_mean_s"]
    missing = out["tokens_per_step"].isna()
    if missing.any():  # records without the token count keep their own throughput
        first = group["tokens_per_s"].mean().reset_index(drop=True)
        out.loc[missing, "tokens_per_s"] = first[missing]
    return out


def compose_measured(models: StepModels, table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The composed prediction of every measured config, priced on the global batches its
    measurement ran (its own warm-up and timed steps); units carry the table's index."""
    comps, units = [], []
    for (warmup, steps), group in table.groupby(["warmup", "steps"], sort=False):
        predictor = StepPredictor(models, warmup=int(warmup), steps=int(steps))
        rcs = [RunConfig.model_validate_json(j) for j in group.config_json]
        comp, unit = predictor.compose(rcs)
        comp.index = group.index
        comps.append(comp)
        units.append(StepPredictor.unit_frame(unit, group.index))
    return pd.concat(comps).loc[table.index], pd.concat(units, ignore_index=True)


def fit_calibration(models: StepModels, table: pd.DataFrame,
                    composed: tuple[pd.DataFrame, pd.DataFrame] | None = None,
                    trees: bool = True) -> StepModels:
    """``models`` with the step residual and the memory model fitted on ``table``."""
    comp, units = composed or compose_measured(models, table)
    residual = ResidualModel.fit(comp, table["step_mean_s"].to_numpy(float), models.fingerprint,
                                 trees=trees)
    memory = MemoryModel.fit(units, table["peak_mem_bytes"].astype(float), models.fingerprint)
    return dataclasses.replace(models, residual=residual, memory=memory)


def cross_validate(models: StepModels, table: pd.DataFrame, folds: int = 5,
                   seed: int = 0, trees: bool = True) -> pd.DataFrame:
    """Every config predicted by a residual and memory model fitted without it: per config
    the measured and predicted tokens/s and peak memory, composed-only and calibrated."""
    comp, units = compose_measured(models, table)
    order = np.random.default_rng(seed).permutation(len(table))
    fold_of = np.empty(len(table), int)
    fold_of[order] = np.arange(len(table)) % folds
    pred_step = np.empty(len(table))
    pred_mem = np.empty(len(table))
    for k in range(folds):
        test = fold_of == k
        train_idx = table.index[~test]
        fitted = fit_calibration(models, table.loc[train_idx],
                                 (comp.loc[train_idx], units[units.config.isin(train_idx)]), trees)
        test_idx = table.index[test]
        pred_step[test] = fitted.residual.predict(comp.loc[test_idx])
        pred_mem[test] = fitted.memory.peak(units[units.config.isin(test_idx)]).loc[test_idx]
    prior_mem = MemoryModel(models.fingerprint).peak(units).loc[table.index]
    out = pd.DataFrame({
        "config": [RunConfig.model_validate_json(j).label() for j in table.config_json],
        "world": comp["world"].to_numpy(), "bf16": comp["bf16"].to_numpy(),
        "fold": fold_of,
        "measured_tokens_per_s": table["tokens_per_s"].to_numpy(float),
        "composed_tokens_per_s": (comp["tokens_per_step"] / comp["composed_step_s"]).to_numpy(),
        "predicted_tokens_per_s": comp["tokens_per_step"].to_numpy() / pred_step,
        "measured_peak_mem_bytes": table["peak_mem_bytes"].to_numpy(float),
        "analytic_peak_mem_bytes": prior_mem.to_numpy(float),
        "predicted_peak_mem_bytes": pred_mem,
    }, index=table.index)
    return out


def _topk(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Best true value among the model's top k, over the true best (1.0 is perfect)."""
    top = np.argsort(-pred)[:k]
    return float(truth[top].max() / truth.max())


def score(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """MAPE, Kendall tau and the top-1 / top-5 scores of higher-is-better predictions."""
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)
    tau = pd.Series(pred).corr(pd.Series(truth), method="kendall") if len(pred) > 1 else np.nan
    return {"n": len(pred), "mape": float(np.mean(np.abs(pred - truth) / truth)),
            "kendall_tau": float(tau), "top1": _topk(pred, truth, 1), "top5": _topk(pred, truth, 5)}


def step_accuracy(prior: StepModels, fitted: StepModels, table: pd.DataFrame, folds: int = 5
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The step model's held-out accuracy on tokens/s and peak memory: the composition under
    the prior alone or the per-family models, uncalibrated, calibrated (linear layer), and
    calibrated and corrected (with the trees). Returns the summary and the per-config
    predictions of the full model."""
    cv_prior = cross_validate(prior, table, folds)
    cv_linear = cross_validate(fitted, table, folds, trees=False)
    cv = cross_validate(fitted, table, folds)
    truth = cv.measured_tokens_per_s.to_numpy()
    mem_truth = cv.measured_peak_mem_bytes.to_numpy()
    analytic_mem = score(cv.analytic_peak_mem_bytes.to_numpy(), mem_truth)["mape"]
    fitted_mem = score(cv.predicted_peak_mem_bytes.to_numpy(), mem_truth)["mape"]
    rows = []
    for name, pred, mem in (
            ("prior, composed", cv_prior.composed_tokens_per_s, analytic_mem),
            ("per-family, composed", cv.composed_tokens_per_s, analytic_mem),
            ("prior, calibrated + trees", cv_prior.predicted_tokens_per_s, fitted_mem),
            ("per-family, calibrated", cv_linear.predicted_tokens_per_s, fitted_mem),
            ("per-family, calibrated + trees", cv.predicted_tokens_per_s, fitted_mem)):
        rows.append({"step model": name} | score(pred.to_numpy(), truth)
                    | {"peak_mem_mape": mem})
    per_config = cv.assign(prior_composed_tokens_per_s=cv_prior.composed_tokens_per_s,
                           prior_predicted_tokens_per_s=cv_prior.predicted_tokens_per_s,
                           linear_predicted_tokens_per_s=cv_linear.predicted_tokens_per_s)
    return pd.DataFrame(rows).set_index("step model"), per_config
