"""The step model: family predictions composed into one training step, a residual learned
from real steps, and the memory model.

``cost_models`` never sees a RunConfig. The caller (``autotune.predict``) turns a config into
plain numbers: op rows per family with their counts (``autotune.step_ops``), collective calls
with their sizes, memory features of the heaviest unit of work, and a few step-level features.
This module prices and learns from those.

- Compute: each family's model (or the roofline prior where none was fitted) predicts one run
  of each op shape; the step's compute is count x prediction summed.
- Communication: alpha + bytes x beta per collective call from the collective profile's
  fits (``collective_fit.parquet``); absent a fit for that collective and group size, the
  nearest group size's fit, and absent any, nominal constants, labelled as such.
- Residual: the composition's terms recombined by coefficients fitted on ``autotune
  measure`` records (host time per op launch, per step, the dtype's real rate), then an
  XGBoost correction on what remains; it says how many measurements it has seen.
- Memory: state + max over units of coefficient x analytic feature bytes + allocator
  overhead; the coefficients start at 1 (the analytic count) and are fitted by non-negative
  least squares on measured peaks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cost_models.family import FamilyModel, ModelMismatch
from cost_models.features import Ceilings
from cost_models.prior import roofline_time

__all__ = ["MEMORY_FEATURES", "NOMINAL_LINK", "RESIDUAL_FEATURES", "MemoryModel",
           "ResidualModel", "StepPrediction", "activation_bytes_per_token", "alpha_beta", "compute_breakdown",
           "family_seconds"]

STEP_MODEL_VERSION = 1

# Step-level features of the residual, in order. Ratios and logs keep one model meaningful
# across model sizes; codes are small integers.
RESIDUAL_FEATURES = (
    "log_compute_s", "comm_share", "log_tokens_per_micro_batch", "log_micro_batches",
    "padding_fraction", "attention_share", "recompute_share", "world", "dp", "tp", "pp",
    "zero_stage", "bf16", "cpu_ranks_sharing",
)

# Terms of the calibration layer, in order (see ResidualModel).
STEP_TERMS = ("compute_fp32_s", "compute_bf16_s", "s_per_op_run", "s_per_op_run_tp",
              "comm_s", "s_per_step")

# Memory features (bytes by the analytic count) of a unit of work, summed with fitted
# coefficients; the intercept is the allocator's overhead.
MEMORY_FEATURES = (
    "state",  # parameters, gradients and optimizer moments this rank holds
    "gathered_params",  # parameters FSDP keeps unsharded during the step
    "activations",  # layers that keep their activations, over the unit's tokens
    "checkpoint_inputs",  # checkpointed layers' saved inputs
    "recompute",  # one layer rematerialized during backward
    "attention_scores",  # score matrices where the kernel materializes them
    "kv_state",  # ChunkFlow's key/value state of earlier chunks
    "logits",  # lm head output and its gradient, fp32
)

# The memory model of GPU configs, fitted on traced peaks (suites/memory_traces.py).
GPU_MEMORY_FILE = Path(__file__).resolve().parent / "data" / "memory_gpu.json"

# alpha (s), bandwidth (bytes/s) where no collective profile covers a group: a PCIe/NVLink
# figure would be a guess too, so the label carries the word "nominal".
NOMINAL_LINK = {"cpu": (5e-4, 1e9), "cuda": (2e-5, 5e10)}


@dataclass
class StepPrediction:
    step_time_s: float
    tokens_per_s: float
    peak_mem_bytes: float
    breakdown: dict[str, float]
    calibration: str  # "measured" (residual fitted on real steps) or "prior-only"
    sources: dict[str, str] = field(default_factory=dict)
    residual_measurements: int = 0
    memory_measurements: int = 0
    overlapped_s: float = 0.0  # communication hidden behind compute (not in the breakdown)
    spread: dict[str, float] = field(default_factory=dict)  # low / high step time, where known

    def to_json_dict(self) -> dict:
        return asdict(self)


def activation_bytes_per_token(hidden: int, q: int, kv: int, ffn: int, act_bytes: int) -> int:
    """Bytes one token keeps for backward in one block that is not checkpointed, by the
    analytic count: the two norms' inputs and the residual, q/k/v, the attention output,
    w1/w3 outputs and SwiGLU's (widths as sharded over tp)."""
    return act_bytes * (3 * hidden + q + 2 * kv + q + 3 * ffn)


def family_seconds(rows: pd.DataFrame, family: str, ceilings: Ceilings,
                   models: Mapping[str, FamilyModel] | None = None) -> np.ndarray:
    """One run of each row's op shape, by the family's model or the prior."""
    model = (models or {}).get(family)
    return model.predict(rows, ceilings) if model is not None else roofline_time(rows, ceilings)


def compute_breakdown(rows: Mapping[str, pd.DataFrame], ceilings: Ceilings,
                      models: Mapping[str, FamilyModel] | None = None) -> dict[str, float]:
    """Seconds per family for one step of op rows carrying a ``count`` column."""
    return {family: float((family_seconds(frame, family, ceilings, models)
                           * frame["count"].to_numpy(float)).sum())
            for family, frame in rows.items()}


def alpha_beta(collective: str, ranks: int, fits: pd.DataFrame | None,
               device: str = "cpu") -> tuple[float, float, str]:
    """(seconds per call, seconds per byte, where the figures came from) of one collective
    over ``ranks`` ranks."""
    if ranks <= 1:
        return 0.0, 0.0, "none"
    if fits is not None and len(fits):
        same = fits[fits.collective == collective]
        if len(same):
            nearest = same.iloc[int(np.argmin(np.abs(same.ranks.to_numpy() - ranks)))]
            alpha, beta = float(nearest.alpha_s), float(nearest.beta_s_per_byte)
            # A ring moves 2(n-1)/n of the buffer (all-reduce) or (n-1)/n: scale from the
            # fitted group size to this one.
            scale = ((ranks - 1) / ranks) / ((nearest.ranks - 1) / nearest.ranks)
            how = "profiled" if int(nearest.ranks) == ranks else f"profiled on {nearest.ranks} ranks, scaled"
            return alpha, beta * scale, how
    alpha, bw = NOMINAL_LINK[device]
    factor = 2 * (ranks - 1) / ranks if collective == "all_reduce" else (ranks - 1) / ranks
    return alpha, factor / bw, "nominal"


def _meta_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.meta.json"


def _check_meta(path: Path, fingerprint: str) -> dict:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelMismatch(f"{path} is missing; run `autotune fit` first") from None
    except ValueError:
        raise ModelMismatch(f"{path} is not a step-model metadata file; re-run `autotune fit`") from None
    if meta.get("version") != STEP_MODEL_VERSION:
        raise ModelMismatch(f"{path}: step-model version {meta.get('version')}, this autotune uses "
                            f"{STEP_MODEL_VERSION}; re-run `autotune fit`")
    if meta.get("fingerprint") != fingerprint:
        raise ModelMismatch(f"{path}: fitted on fingerprint {meta.get('fingerprint')}, this "
                            f"machine is {fingerprint}; fit on this machine's measurements")
    return meta


@dataclass
class ResidualModel:
    """What the composition leaves out, learned from measured steps, in two layers.

    1. Calibration: the measured step as a non-negative combination of terms the
       composition prices (``STEP_TERMS``): compute (split by dtype, since a profile may
       not cover every dtype), host time per op launched (Python and dispatch, which no op
       timing holds), its extra under tensor parallelism (DTensor dispatch), communication,
       and a per-step constant (optimizer bookkeeping, zero_grad, the loss all-reduce).
       Fitted by NNLS on relative error, it needs few measurements and extrapolates like
       the physics it mirrors.
    2. Correction: XGBoost on the remaining log ratio over ``RESIDUAL_FEATURES``, shallow
       and regularized, only once ``MIN_TREE`` measurements exist.

    With no measurements the composed step stands (prior-only)."""

    fingerprint: str
    n_measurements: int = 0
    coef: dict[str, float] | None = None
    booster: object | None = None

    PARAMS = {"objective": "reg:squarederror", "eta": 0.05, "max_depth": 2, "subsample": 0.8,
              "min_child_weight": 3, "lambda": 5.0, "seed": 0, "nthread": 0}
    ROUNDS = 150
    MIN_LINEAR = 8  # terms + 2
    MIN_TREE = 30

    @staticmethod
    def terms(features: pd.DataFrame) -> np.ndarray:
        bf16 = features["bf16"].to_numpy(float)
        compute = ((features["compute_s"] + features["bubble_s"])
                   * features["cpu_ranks_sharing"]).to_numpy(float)
        runs = features["op_runs"].to_numpy(float)
        return np.column_stack([compute * (1 - bf16), compute * bf16, runs,
                                runs * (features["tp"].to_numpy(float) > 1),
                                features["comm_s"].to_numpy(float), np.ones(len(features))])

    def calibrated(self, features: pd.DataFrame) -> np.ndarray:
        """Step seconds after the calibration layer (the composed step without one)."""
        if self.coef is None:
            return features["composed_step_s"].to_numpy(float)
        return self.terms(features) @ np.array([self.coef[t] for t in STEP_TERMS])

    @classmethod
    def fit(cls, features: pd.DataFrame, measured_s: np.ndarray, fingerprint: str,
            trees: bool = True) -> ResidualModel:
        from scipy.optimize import nnls

        y = np.asarray(measured_s, float)
        if len(y) < cls.MIN_LINEAR:
            return cls(fingerprint, len(y))
        sol, _ = nnls(cls.terms(features) / y[:, None], np.ones(len(y)))
        model = cls(fingerprint, len(y), dict(zip(STEP_TERMS, map(float, sol))))
        if trees and len(y) >= cls.MIN_TREE:
            import xgboost as xgb

            x = features[list(RESIDUAL_FEATURES)].to_numpy(float)
            dm = xgb.DMatrix(x, label=np.log(y / model.calibrated(features)),
                             feature_names=list(RESIDUAL_FEATURES))
            model.booster = xgb.train(cls.PARAMS, dm, num_boost_round=cls.ROUNDS)
        return model

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Predicted step seconds."""
        out = self.calibrated(features)
        if self.booster is None:
            return out
        import xgboost as xgb

        dm = xgb.DMatrix(features[list(RESIDUAL_FEATURES)].to_numpy(float),
                         feature_names=list(RESIDUAL_FEATURES))
        return out * np.exp(self.booster.predict(dm))

    def save(self, folder: Path) -> None:
        from profilers.store import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.booster is not None:
            atomic_write_text(folder / "step_residual.json",
                              self.booster.save_raw(raw_format="json").decode())
        meta = {"version": STEP_MODEL_VERSION, "terms": list(STEP_TERMS),
                "features": list(RESIDUAL_FEATURES), "fingerprint": self.fingerprint,
                "n_measurements": self.n_measurements, "coef": self.coef,
                "trees": self.booster is not None}
        atomic_write_text(_meta_path(folder, "step_residual"), json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, fingerprint: str) -> ResidualModel:
        meta = _check_meta(_meta_path(folder, "step_residual"), fingerprint)
        if meta.get("features") != list(RESIDUAL_FEATURES) or meta.get("terms") != list(STEP_TERMS):
            raise ModelMismatch(f"{_meta_path(folder, 'step_residual')}: another feature list; "
                                f"re-run `autotune fit`")
        booster = None
        if meta.get("trees"):
            import xgboost as xgb

            booster = xgb.Booster()
            booster.load_model(str(Path(folder) / "step_residual.json"))
        return cls(fingerprint, int(meta["n_measurements"]), meta.get("coef"), booster)


@dataclass
class MemoryModel:
    """Peak bytes = state + max over units of coef . unit features + overhead."""

    fingerprint: str
    coef: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MEMORY_FEATURES, 1.0))
    overhead_bytes: float = 0.0
    n_measurements: int = 0
    kind: str = "measured"  # what the peaks it was fitted on are: measured, or traced

    @classmethod
    def traced_gpu(cls, path: Path = GPU_MEMORY_FILE) -> MemoryModel:
        """The GPU memory model fitted on peaks traced at real size under fake tensors
        (``python -m suites.memory_traces``); the counts of ``autotune.predict`` for CUDA
        configs. Device-independent: the bytes a rank holds do not depend on the GPU."""
        meta = json.loads(Path(path).read_text())
        if sorted(meta["coef"]) != sorted(MEMORY_FEATURES):
            raise ModelMismatch(f"{path}: another feature list; re-run python -m suites.memory_traces")
        return cls("traced:gpu", {k: float(v) for k, v in meta["coef"].items()},
                   float(meta["overhead_bytes"]), int(meta["n_traces"]), "traced")

    def unit_bytes(self, units: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Predicted bytes per unit: a frame with the ``MEMORY_FEATURES`` columns, or an
        array of them in that order."""
        w = np.array([self.coef[f] for f in MEMORY_FEATURES])
        x = units[list(MEMORY_FEATURES)].to_numpy(float) if isinstance(units, pd.DataFrame) else units
        return x @ w + self.overhead_bytes

    def peak(self, units: pd.DataFrame, group: str = "config") -> pd.Series:
        """Largest predicted unit per ``group`` value."""
        return pd.Series(self.unit_bytes(units), index=units.index).groupby(units[group]).max()

    @classmethod
    def fit(cls, units: pd.DataFrame, measured: pd.Series, fingerprint: str,
            iterations: int = 4, *, overhead: bool = True, kind: str = "measured") -> MemoryModel:
        """NNLS on the unit each config's peak comes from; the argmax unit depends on the
        coefficients, so alternate a few times (starting from the analytic ones).
        ``overhead``: fit the allocator's constant too (measured peaks have one; traced live
        bytes do not, and a free constant would stand in for whatever term most configs
        share)."""
        from scipy.optimize import nnls

        model = cls(fingerprint, kind=kind)
        cols = list(MEMORY_FEATURES)
        for _ in range(iterations):
            pred = pd.Series(model.unit_bytes(units), index=units.index)
            top = units.loc[pred.groupby(units["config"]).idxmax()].set_index("config")
            top = top.loc[measured.index]
            scale = measured.to_numpy(float)  # relative error: divide each row by its target
            a = np.column_stack([top[cols].to_numpy(float), np.ones(len(top))]) / scale[:, None]
            keep = a[:, :-1].any(axis=0)  # features no config exercises stay analytic
            design = a[:, :-1][:, keep]
            if overhead:
                design = np.column_stack([design, a[:, -1]])
            sol, _ = nnls(design, np.ones(len(top)))
            coef = dict(model.coef)
            for name, value in zip([c for c, k in zip(cols, keep) if k], sol):
                coef[name] = float(value)
            model = cls(fingerprint, coef, float(sol[-1]) if overhead else 0.0, len(top), kind)
        return model

    def save(self, folder: Path) -> None:
        from profilers.store import atomic_write_text

        meta = {"version": STEP_MODEL_VERSION, "fingerprint": self.fingerprint,
                "n_measurements": self.n_measurements, "coef": self.coef,
                "overhead_bytes": self.overhead_bytes}
        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_write_text(_meta_path(folder, "memory"), json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, fingerprint: str) -> MemoryModel:
        meta = _check_meta(_meta_path(folder, "memory"), fingerprint)
        if sorted(meta.get("coef", {})) != sorted(MEMORY_FEATURES):
            raise ModelMismatch(f"{_meta_path(folder, 'memory')}: another feature list; "
                                f"re-run `autotune fit`")
        return cls(fingerprint, {k: float(v) for k, v in meta["coef"].items()},
                   float(meta["overhead_bytes"]), int(meta["n_measurements"]))
