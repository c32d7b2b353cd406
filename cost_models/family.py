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

__all__ = ["MIN_SAMPLES", "FamilyModel", "ModelMismatch", "fit_family", "target_seconds"]

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
