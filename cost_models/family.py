"""Per-family learned models (FamilySeer): one XGBoost regressor per op family on log time,
with the analytic prior as base margin, so the trees learn only the prior's error and a
family with few samples still predicts sensibly.

A model is saved as XGBoost's own JSON plus a small metadata file (feature version, feature
list, fingerprint, training-set size, kind); never a pickle. Loading checks the fingerprint
and the feature version and refuses a model trained for another machine or feature set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cost_models.features import FEATURE_VERSION, Ceilings, family_features, feature_names
from cost_models.prior import roofline_time

__all__ = ["KERNEL_KNOBS", "MIN_SAMPLES", "FamilyModel", "FamilyRanker", "ModelMismatch",
           "fit_family", "instance_keys", "target_seconds"]

MIN_SAMPLES = 30  # below this a family keeps the prior: trees on fewer rows mostly memorize
_PARAMS = {"objective": "reg:squarederror", "eta": 0.1, "max_depth": 5, "subsample": 0.9,
           "min_child_weight": 2, "lambda": 1.0, "seed": 0, "nthread": 0}
_ROUNDS = 300


class ModelMismatch(ValueError):
    """A saved model that does not belong to this machine or this feature set."""


def target_seconds(rows: pd.DataFrame) -> np.ndarray:
    """What a model learns: the drift-scaled median where the sweep recorded it, else the
    plain median."""
    if "median_at_reference_s" in rows:
        return rows["median_at_reference_s"].fillna(rows["median_s"]).to_numpy(float)
    return rows["median_s"].to_numpy(float)


@dataclass
class FamilyModel:
    family: str
    fingerprint: str
    n_train: int
    booster: object | None = None  # xgboost.Booster; None: the prior alone

    @property
    def kind(self) -> str:
        return "learned" if self.booster is not None else "prior"

    def predict(self, rows: pd.DataFrame, ceilings: Ceilings) -> np.ndarray:
        """Seconds per row."""
        prior = roofline_time(rows, ceilings)
        if self.booster is None:
            return prior
        import xgboost as xgb

        x = family_features(self.family, rows, ceilings)
        dm = xgb.DMatrix(x.to_numpy(float), feature_names=list(x.columns),
                         base_margin=np.log(prior))
        return np.exp(self.booster.predict(dm))

    def save(self, folder: Path) -> None:
        from profilers.store import atomic_write_text

        folder = Path(folder)
        meta = {"family": self.family, "feature_version": FEATURE_VERSION,
                "features": feature_names(self.family), "fingerprint": self.fingerprint,
                "n_train": self.n_train, "kind": self.kind}
        if self.booster is not None:
            folder.mkdir(parents=True, exist_ok=True)
            raw = self.booster.save_raw(raw_format="json").decode()
            atomic_write_text(folder / f"{self.family}.json", raw)
        atomic_write_text(folder / f"{self.family}.meta.json", json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, family: str, fingerprint: str) -> FamilyModel:
        folder = Path(folder)
        path = folder / f"{family}.meta.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelMismatch(f"{path} is missing; run `autotune fit` first") from None
        if meta.get("feature_version") != FEATURE_VERSION or meta.get("features") != feature_names(family):
            raise ModelMismatch(f"{path}: trained on feature version {meta.get('feature_version')}, "
                                f"this autotune uses {FEATURE_VERSION}; re-run `autotune fit`")
        if meta.get("fingerprint") != fingerprint:
            raise ModelMismatch(f"{path}: trained on fingerprint {meta.get('fingerprint')}, this "
                                f"machine is {fingerprint}; fit on this machine's profiles")
        booster = None
        if meta["kind"] == "learned":
            import xgboost as xgb

            booster = xgb.Booster()
            booster.load_model(str(folder / f"{family}.json"))
        return cls(family, fingerprint, int(meta["n_train"]), booster)


def fit_family(family: str, rows: pd.DataFrame, ceilings: Ceilings, fingerprint: str, *,
               min_samples: int = MIN_SAMPLES, rounds: int = _ROUNDS) -> FamilyModel:
    """Fit on the COMPLETE pooled rows of one family (``profilers.ops.pool_windows``)."""
    ok = rows[rows.status == "COMPLETE"]
    if len(ok) < min_samples:
        return FamilyModel(family, fingerprint, len(ok))
    import xgboost as xgb

    x = family_features(family, ok, ceilings)
    dm = xgb.DMatrix(x.to_numpy(float), label=np.log(target_seconds(ok)),
                     feature_names=list(x.columns), base_margin=np.log(roofline_time(ok, ceilings)))
    booster = xgb.train(_PARAMS, dm, num_boost_round=rounds)
    return FamilyModel(family, fingerprint, len(ok), booster)


# Kernel configs the step can choose per op, by family: a ranker orders them per instance.
KERNEL_KNOBS = {"attention": ("impl",)}
# What makes two rows the same op instance apart from its kernel config.
_INSTANCE = {"attention": ("op", "pass", "dtype", "heads", "kv_heads", "head_dim", "seqlens",
                           "prefix")}


def instance_keys(family: str, rows: pd.DataFrame) -> pd.Series:
    """One string per op instance (the shape without its kernel config)."""
    cols = [c for c in _INSTANCE[family] if c in rows]
    parts = [rows[c].map(lambda v: str(list(v)) if hasattr(v, "__len__") and not isinstance(v, str)
                         else str(v)) for c in cols]
    out = parts[0]
    for part in parts[1:]:
        out = out + "|" + part
    return out


def fit_pairwise(x: pd.DataFrame, seconds: np.ndarray, groups: np.ndarray, *,
                 rounds: int = 100):  # noqa: ANN201 - an xgboost Booster
    """XGBoost ``rank:pairwise``: within each group (one op instance or kernel shape), which
    rows (configs) are faster. Relevance is how many configs of the group a row beats."""
    import xgboost as xgb

    order = np.argsort(groups, kind="stable")
    x, seconds, groups = x.iloc[order], np.asarray(seconds, float)[order], np.asarray(groups)[order]
    relevance = pd.Series(seconds).groupby(groups).rank(ascending=False).to_numpy() - 1
    dm = xgb.DMatrix(x.to_numpy(float), label=relevance, feature_names=list(x.columns))
    _, sizes = np.unique(groups, return_counts=True)
    dm.set_group(sizes)
    return xgb.train({"objective": "rank:pairwise", "eta": 0.1, "max_depth": 4, "seed": 0,
                      "nthread": 0}, dm, num_boost_round=rounds)


@dataclass
class FamilyRanker:
    """XGBoost ``rank:pairwise`` over the kernel configs of one op instance: which config
    is fastest, learned from instances profiled under several configs. Saved as
    ``<family>.ranker.json`` plus its metadata."""

    family: str
    fingerprint: str
    n_groups: int
    booster: object

    @classmethod
    def fit(cls, family: str, rows: pd.DataFrame, ceilings: Ceilings,
            fingerprint: str) -> FamilyRanker | None:
        """None when no instance was profiled under two configs or more."""

        ok = rows[rows.status == "COMPLETE"].copy()
        ok["_instance"] = instance_keys(family, ok).to_numpy()
        sizes = ok.groupby("_instance").size()
        ok = ok[ok["_instance"].isin(sizes[sizes > 1].index)].sort_values("_instance")
        if ok.empty:
            return None
        booster = fit_pairwise(family_features(family, ok, ceilings), target_seconds(ok),
                               ok["_instance"].to_numpy())
        return cls(family, fingerprint, int(ok["_instance"].nunique()), booster)

    def scores(self, rows: pd.DataFrame, ceilings: Ceilings) -> np.ndarray:
        """Higher is faster, comparable within an instance."""
        import xgboost as xgb

        x = family_features(self.family, rows, ceilings)
        return self.booster.predict(xgb.DMatrix(x.to_numpy(float), feature_names=list(x.columns)))

    def save(self, folder: Path) -> None:
        from profilers.store import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / f"{self.family}.ranker.json",
                          self.booster.save_raw(raw_format="json").decode())
        meta = {"family": self.family, "feature_version": FEATURE_VERSION,
                "features": feature_names(self.family), "fingerprint": self.fingerprint,
                "n_groups": self.n_groups, "kind": "ranker"}
        atomic_write_text(folder / f"{self.family}.ranker.meta.json", json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, family: str, fingerprint: str) -> FamilyRanker:
        import xgboost as xgb

        path = Path(folder) / f"{family}.ranker.meta.json"
        meta = json.loads(path.read_text())
        if meta.get("feature_version") != FEATURE_VERSION or meta.get("fingerprint") != fingerprint:
            raise ModelMismatch(f"{path}: fitted on feature version {meta.get('feature_version')} "
                                f"and fingerprint {meta.get('fingerprint')}; this is "
                                f"{FEATURE_VERSION} and {fingerprint}; re-run `autotune fit`")
        booster = xgb.Booster()
        booster.load_model(str(Path(folder) / f"{family}.ranker.json"))
        return cls(family, fingerprint, int(meta["n_groups"]), booster)
