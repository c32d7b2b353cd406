"""Fitting the per-family models from a profile store, and judging them on held-out cases
against one global model and the prior alone.

Held-out cases are chosen by a hash of the case key (a whole case with all its windows,
never single rows), so a test case's samples never inform its own prediction.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from cost_models.family import (
    KERNEL_KNOBS,
    FamilyModel,
    FamilyRanker,
    fit_family,
    instance_keys,
    target_seconds,
)
from cost_models.features import Ceilings, family_features
from cost_models.prior import roofline_time
from profilers.families import OP_FAMILIES

__all__ = ["evaluate", "fit_all", "fit_rankers", "held_out", "kernel_choice", "load_family",
           "profiled_dtypes"]

_COMMON = ["log2_flops", "log2_bytes", "intensity", "dtype", "pass", "log2_peak_flops",
           "log2_bandwidth"]


def load_family(store, family: str) -> pd.DataFrame:  # noqa: ANN001
    """COMPLETE cases of ``family``, windows pooled."""
    from profilers.ops import pool_windows

    rows = pool_windows(store.load(family))
    return rows[rows.status == "COMPLETE"].reset_index(drop=True) if len(rows) else rows


def profiled_dtypes(store) -> list[str]:  # noqa: ANN001
    """The dtypes of the store's COMPLETE op-family cases, whose matmul ceilings the fit
    divides by; empty when it holds none to fit."""
    found: set[str] = set()
    for family in OP_FAMILIES:
        rows = load_family(store, family)
        if len(rows):
            found |= set(rows["dtype"])
    return sorted(found)


def held_out(keys: pd.Series, fraction: float = 0.2) -> np.ndarray:
    """True for the cases held out: a stable hash of the case key, not a random row draw."""
    h = keys.map(lambda k: int(hashlib.sha256(str(k).encode()).hexdigest()[:8], 16) / 2**32)
    return (h < fraction).to_numpy()


def fit_all(store, out: Path | None = None) -> tuple[dict[str, FamilyModel], Ceilings]:  # noqa: ANN001
    ceilings = Ceilings.from_table(store.load("ceiling"))
    models = {}
    for family in OP_FAMILIES:
        rows = load_family(store, family)
        if len(rows):
            models[family] = fit_family(family, rows, ceilings, store.fingerprint_key)
            if out is not None:
                models[family].save(out)
    return models, ceilings


def _global_predict(train: dict[str, pd.DataFrame], test: dict[str, pd.DataFrame],
                    ceilings: Ceilings) -> dict[str, np.ndarray]:
    """One XGBoost over every family (common features plus the family as a one-hot), the
    prior as base margin: the FamilySeer paper's baseline."""
    import xgboost as xgb

    def matrix(frames: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        xs, ys, ms = [], [], []
        for fam, rows in frames.items():
            x = family_features(fam, rows, ceilings)[_COMMON].copy()
            for f in OP_FAMILIES:
                x[f"fam_{f}"] = float(f == fam)
            xs.append(x)
            ys.append(np.log(target_seconds(rows)) if len(rows) else np.array([]))
            ms.append(np.log(roofline_time(rows, ceilings)))
        return pd.concat(xs, ignore_index=True), np.concatenate(ys), np.concatenate(ms)

    x, y, m = matrix(train)
    booster = xgb.train({"objective": "reg:squarederror", "eta": 0.1, "max_depth": 6,
                         "subsample": 0.9, "seed": 0}, xgb.DMatrix(x.to_numpy(float), label=y,
                                                                   base_margin=m), 400)
    out = {}
    for fam, rows in test.items():
        if rows.empty:  # nothing held out of this family
            continue
        xt, _, mt = matrix({fam: rows})
        out[fam] = np.exp(booster.predict(xgb.DMatrix(xt.to_numpy(float), base_margin=mt)))
    return out


def evaluate(store, fraction: float = 0.2) -> pd.DataFrame:  # noqa: ANN001
    """Per family, on the held-out cases: MAPE and Kendall tau of the per-family model, the
    global model and the prior alone."""
    ceilings = Ceilings.from_table(store.load("ceiling"))
    train, test = {}, {}
    for family in OP_FAMILIES:
        rows = load_family(store, family)
        if len(rows) == 0:
            continue
        mask = held_out(rows.key, fraction)
        train[family], test[family] = rows[~mask].reset_index(drop=True), rows[mask].reset_index(drop=True)
    glob = _global_predict(train, test, ceilings)
    out = []
    for family in train:
        truth = target_seconds(test[family])
        if len(truth) == 0:
            continue
        model = fit_family(family, train[family], ceilings, store.fingerprint_key)
        per = model.predict(test[family], ceilings)
        for name, pred in (("per-family", per), ("global", glob[family]),
                           ("prior", roofline_time(test[family], ceilings))):
            tau = pd.Series(pred).corr(pd.Series(truth), method="kendall") if len(truth) > 1 else np.nan
            out.append({"family": family, "model": name, "train": len(train[family]),
                        "test": len(truth), "mape": float(np.mean(np.abs(pred - truth) / truth)),
                        "kendall_tau": float(tau)})
    return pd.DataFrame(out)


def kernel_choice(store, fraction: float = 0.3) -> pd.DataFrame:  # noqa: ANN001
    """Choosing each held-out op instance's kernel config: the ranker's pick, the per-family
    regressor's (fastest predicted) and the prior's, against the measured fastest. ``top1``
    is the share of instances where the pick is the fastest, ``top1_score`` the mean of
    fastest time / picked time (1.0 is perfect). Held out by instance, never by row."""
    ceilings = Ceilings.from_table(store.load("ceiling"))
    out = []
    for family in KERNEL_KNOBS:
        rows = load_family(store, family)
        if len(rows) == 0:
            continue
        rows = rows.assign(_instance=instance_keys(family, rows).to_numpy())
        sizes = rows.groupby("_instance").size()
        rows = rows[rows["_instance"].isin(sizes[sizes > 1].index)].reset_index(drop=True)
        if rows.empty:
            continue
        test_mask = held_out(rows["_instance"], fraction)
        train, test = rows[~test_mask], rows[test_mask].reset_index(drop=True)
        ranker = FamilyRanker.fit(family, train, ceilings, store.fingerprint_key)
        if ranker is None or test.empty:
            continue
        regressor = fit_family(family, train, ceilings, store.fingerprint_key)
        truth = target_seconds(test)
        picks = {"ranker": -ranker.scores(test, ceilings),
                 "per-family regressor": regressor.predict(test, ceilings),
                 "prior": roofline_time(test, ceilings)}
        for name, cost in picks.items():
            frame = pd.DataFrame({"instance": test["_instance"], "truth": truth, "cost": cost})
            chosen = frame.loc[frame.groupby("instance").cost.idxmin()].set_index("instance").truth
            best = frame.groupby("instance").truth.min()
            out.append({"family": family, "chooser": name, "train_instances":
                        int(train["_instance"].nunique()), "test_instances": len(best),
                        "top1": float((chosen.loc[best.index] == best).mean()),
                        "top1_score": float((best / chosen.loc[best.index]).mean())})
    return pd.DataFrame(out)


def fit_rankers(store) -> dict[str, FamilyRanker]:  # noqa: ANN001
    """A kernel-config ranker per family whose profile holds instances under two configs."""
    ceilings = Ceilings.from_table(store.load("ceiling"))
    out = {}
    for family in KERNEL_KNOBS:
        rows = load_family(store, family)
        if len(rows):
            ranker = FamilyRanker.fit(family, rows, ceilings, store.fingerprint_key)
            if ranker is not None:
                out[family] = ranker
    return out
