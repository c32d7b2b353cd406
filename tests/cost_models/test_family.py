"""Per-family models: they learn the prior's error, round-trip through XGBoost JSON, and
refuse a model of another machine or feature version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cost_models.family import FamilyModel, ModelMismatch, fit_family
from cost_models.features import Ceilings
from cost_models.prior import roofline_time
from profilers.families import analytic_cost

CEIL = Ceilings({"fp32": 1e11}, 2e10)


def _gemm_rows(seed: int) -> pd.DataFrame:
    """Synthetic measurements: the roofline slowed by a shape-dependent factor the prior does
    not know (small m runs at a fraction of peak), with 3% noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in (16, 32, 64, 128, 256, 512, 1024, 2048):
        for k, n in ((192, 192), (192, 512), (512, 192), (192, 64)):
            for p in ("fwd", "bwd"):
                c = {"family": "gemm", "op": "linear", "pass": p, "dtype": "fp32", "m": m, "k": k, "n": n}
                flops, nbytes = analytic_cost(c)
                rows.append(c | {"flops": flops, "bytes": nbytes, "status": "COMPLETE"})
    frame = pd.DataFrame(rows)
    efficiency = np.minimum(1.0, frame.m.to_numpy() / 512.0) * 0.8
    frame["median_s"] = roofline_time(frame, CEIL) / efficiency * rng.uniform(0.97, 1.03, len(frame))
    return frame


def _mape(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - true) / true))


def test_the_learned_model_corrects_the_prior_on_held_out_shapes() -> None:
    train, test = _gemm_rows(0), _gemm_rows(1)
    test = test[test.m.isin([64, 256, 1024])]  # an independent draw, a subset of the shapes
    model = fit_family("gemm", train, CEIL, "fp")
    assert model.kind == "learned" and model.n_train == len(train)
    learned = _mape(model.predict(test, CEIL), test.median_s.to_numpy())
    prior = _mape(roofline_time(test, CEIL), test.median_s.to_numpy())
    assert prior > 0.5  # the prior misses the small-m slowdown by design
    assert learned < 0.08  # within noise plus a little


def test_too_few_samples_keep_the_prior() -> None:
    rows = _gemm_rows(0).head(10)
    model = fit_family("gemm", rows, CEIL, "fp")
    assert model.kind == "prior"
    np.testing.assert_allclose(model.predict(rows, CEIL), roofline_time(rows, CEIL))


def test_models_round_trip_and_refuse_other_machines(tmp_path: Path) -> None:
    rows = _gemm_rows(0)
    model = fit_family("gemm", rows, CEIL, "fp-a")
    model.save(tmp_path)
    assert json.loads((tmp_path / "gemm.meta.json").read_text())["n_train"] == len(rows)
    again = FamilyModel.load(tmp_path, "gemm", "fp-a")
    np.testing.assert_allclose(again.predict(rows, CEIL), model.predict(rows, CEIL), rtol=1e-6)
    with pytest.raises(ModelMismatch, match="trained on fingerprint fp-a, this machine is fp-b"):
        FamilyModel.load(tmp_path, "gemm", "fp-b")
    meta = json.loads((tmp_path / "gemm.meta.json").read_text())
    (tmp_path / "gemm.meta.json").write_text(json.dumps(meta | {"feature_version": 0}))
    with pytest.raises(ModelMismatch, match="feature version 0"):
        FamilyModel.load(tmp_path, "gemm", "fp-a")


def _attention_rows(seed: int) -> pd.DataFrame:
    """Both kernels on many sequence mixes: eager wins below 256 tokens (no kernel launch
    overhead to pay), sdpa above (no score matrix to write); the prior sees the same FLOPs
    and bytes for both and cannot tell."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(60):
        seqlens = [int(x) for x in rng.integers(8, 400, rng.integers(1, 4))]
        for impl in ("sdpa", "eager"):
            c = {"family": "attention", "op": "varlen", "pass": "fwd", "dtype": "fp32",
                 "impl": impl, "seqlens": seqlens, "heads": 4, "kv_heads": 2, "head_dim": 32,
                 "prefix": 0}
            flops, nbytes = analytic_cost(c)
            rows.append(c | {"flops": flops, "bytes": nbytes, "status": "COMPLETE"})
    frame = pd.DataFrame(rows)
    tokens = frame.seqlens.map(sum).to_numpy()
    eager = (frame.impl == "eager").to_numpy()
    factor = np.where(eager, 0.5 + tokens / 256.0, 1.5)
    frame["median_s"] = roofline_time(frame, CEIL) * factor * rng.uniform(0.98, 1.02, len(frame))
    return frame


def test_the_ranker_picks_the_faster_kernel_of_held_out_instances() -> None:
    from cost_models.family import FamilyRanker, instance_keys

    train, test = _attention_rows(0), _attention_rows(1)
    ranker = FamilyRanker.fit("attention", train, CEIL, "fp")
    assert ranker is not None and ranker.n_groups == 60
    test = test.assign(score=ranker.scores(test, CEIL), inst=instance_keys("attention", test))
    picked = test.loc[test.groupby("inst").score.idxmax()].set_index("inst").impl
    fastest = test.loc[test.groupby("inst").median_s.idxmin()].set_index("inst").impl
    tokens = test.groupby("inst").seqlens.first().map(sum)
    clear = (tokens - 256).abs() > 40  # away from the crossover, where noise can flip it
    assert (picked[clear] == fastest[clear]).mean() >= 0.95
    # the prior has no kernel term: its times tie within every instance
    prior = roofline_time(test, CEIL)
    assert np.allclose(prior[::2], prior[1::2])


def test_no_ranker_without_instances_under_two_configs() -> None:
    from cost_models.family import FamilyRanker

    rows = _attention_rows(0)
    assert FamilyRanker.fit("attention", rows[rows.impl == "sdpa"], CEIL, "fp") is None
