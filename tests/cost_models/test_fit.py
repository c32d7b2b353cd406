"""Fitting from a profile store and the held-out ablation, on a synthetic store whose truth
the prior cannot know."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cost_models.family import FamilyModel
from cost_models.features import Ceilings
from cost_models.fit import evaluate, fit_all, held_out
from cost_models.prior import roofline_time
from profilers.families import analytic_cost
from profilers.ops import case_key
from profilers.store import ProfileStore

CEIL = Ceilings({"fp32": 1e11}, 2e10)


def _store(tmp_path: Path) -> ProfileStore:
    store = ProfileStore.open(tmp_path, "fp")
    rng = np.random.default_rng(0)
    rows = []
    for m in range(16, 2048, 24):
        for k, n in ((192, 192), (192, 512), (512, 192)):
            case = {"family": "gemm", "op": "linear", "pass": "fwd", "dtype": "fp32",
                    "m": m, "k": k, "n": n}
            flops, nbytes = analytic_cost(case)
            true = roofline_time(pd.DataFrame([case | {"flops": flops, "bytes": nbytes}]), CEIL)[0]
            true /= min(1.0, m / 512) * 0.8  # small m runs below peak: unknown to the prior
            for w in range(2):
                samples = list(true * rng.uniform(0.97, 1.03, 5))
                key = case_key(case)
                rows.append({"key": f"{key}/{w}", "case": key, "window": w, **case,
                             "flops": flops, "bytes": nbytes, "status": "COMPLETE", "error": "",
                             "median_s": float(np.median(samples)), "iqr_s": 0.0,
                             "min_s": min(samples), "n_samples": 5, "calls_per_sample": 1,
                             "foreign_cpu": 0.0, "attempts": 1, "canary_s": 1.0,
                             "canary_ref_s": 1.0, "samples_s": samples})
    store.append("gemm", pd.DataFrame(rows))
    store.append("ceiling", pd.DataFrame([
        {"key": "matmul:fp32", "family": "ceiling", "what": "matmul", "dtype": "fp32",
         "flops_per_s": 1e11, "bytes_per_s": None},
        {"key": "copy", "family": "ceiling", "what": "copy", "dtype": None,
         "flops_per_s": None, "bytes_per_s": 2e10}]))
    return store


def test_held_out_cases_are_a_stable_fifth() -> None:
    keys = pd.Series([f"case-{i}" for i in range(2000)])
    mask = held_out(keys)
    assert 0.17 < mask.mean() < 0.23
    assert (held_out(keys) == mask).all()


def test_per_family_beats_the_prior_on_held_out_cases(tmp_path: Path) -> None:
    table = evaluate(_store(tmp_path)).set_index("model")
    assert set(table.index) == {"per-family", "global", "prior"}
    assert table.loc["prior", "mape"] > 0.2  # the slowdown below m = 512 is invisible to it
    assert table.loc["per-family", "mape"] < 0.1
    assert table.loc["per-family", "test"] > 10


def test_fit_all_saves_models_that_load_back(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    models, ceilings = fit_all(store, tmp_path / "models")
    again = FamilyModel.load(tmp_path / "models", "gemm", "fp")
    rows = store.load("gemm").drop_duplicates("case").head(5)
    np.testing.assert_allclose(again.predict(rows, ceilings), models["gemm"].predict(rows, ceilings))
