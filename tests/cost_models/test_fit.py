"""Fitting from a profile store and the held-out ablation, on a synthetic store whose truth
the prior cannot know."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cost_models.family import FamilyModel
from cost_models.fit import evaluate, fit_all, held_out
from profilers.store import ProfileStore


def test_held_out_cases_are_a_stable_fifth() -> None:
    keys = pd.Series([f"case-{i}" for i in range(2000)])
    mask = held_out(keys)
    assert 0.17 < mask.mean() < 0.23
    assert (held_out(keys) == mask).all()


def test_per_family_beats_the_prior_on_held_out_cases(gemm_store: ProfileStore) -> None:
    table = evaluate(gemm_store).set_index("model")
    assert set(table.index) == {"per-family", "global", "prior"}
    assert table.loc["prior", "mape"] > 0.2  # the slowdown below m = 512 is invisible to it
    assert table.loc["per-family", "mape"] < 0.1
    assert table.loc["per-family", "test"] > 10


def test_fit_all_saves_models_that_load_back(tmp_path: Path, gemm_store: ProfileStore) -> None:
    store = gemm_store
    models, ceilings = fit_all(store, tmp_path / "models")
    again = FamilyModel.load(tmp_path / "models", "gemm", "fp")
    rows = store.load("gemm").drop_duplicates("case").head(5)
    np.testing.assert_allclose(again.predict(rows, ceilings), models["gemm"].predict(rows, ceilings))
