"""Each op family of the registry is known to every reader: the profiler builds and runs its
cases, the features turn them into a full matrix, both priors price them, the step model
composes the in-step ones, and its analytic cost matches a hand count. A family added to
``FAMILY`` without its place in any of these fails here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from autotune.config import SearchSpace, Workload
from autotune.predict import StepPredictor
from autotune.profile_grid import op_cases
from autotune.step_ops import step_op_rows
from cost_models.bundle import StepModels
from cost_models.features import Ceilings, family_features, feature_names
from cost_models.gpu_prior import OpPrior
from cost_models.prior import roofline_time
from profilers.families import FAMILY, OP_FAMILIES, STEP_FAMILIES, analytic_cost
from profilers.ops import _build

WORKLOAD = Workload.model_validate({
    "model": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "ffn": 64, "vocab": 64},
    "data": {"preset": "longsft", "num_sequences": 16, "max_len": 64, "seed": 0},
    "budget": {"global_batch_tokens": 256}})
CEIL = Ceilings({"fp32": 1e10, "bf16": 2e10}, 1e10)


def _cases(name: str) -> list[dict]:
    got = [c for c in op_cases(WORKLOAD, SearchSpace(), (name,)) if c["family"] == name]
    assert got, f"the profiler sweeps no case of {name}"
    return got


def _step_rows(name: str) -> pd.DataFrame:
    """The family's ops in one step of the untuned baseline, as the step model prices them."""
    from autotune.data import load_lengths, step_plans
    from autotune.portfolio import baseline_configs

    rc = baseline_configs(WORKLOAD)[0]
    dims = rc.workload.model.resolve()
    batch = next(iter(step_plans(rc, load_lengths(rc.workload.data, dims).lengths, dims)))
    return step_op_rows(rc, batch.ranks[0], dims)[name]


@pytest.mark.parametrize("name", OP_FAMILIES)
def test_every_reader_knows_the_family(name: str) -> None:
    cases = _cases(name)  # what the profiler sweeps
    profiled = pd.DataFrame([c | dict(zip(("flops", "bytes"), analytic_cost(c), strict=True))
                             for c in cases])
    stepped = _step_rows(name)  # what the step model prices
    for rows in (profiled, stepped):
        assert len(rows) and (rows.flops > 0).all() and (rows.bytes > 0).all()
        feats = family_features(name, rows, CEIL)
        assert list(feats.columns) == feature_names(name)
        assert np.isfinite(feats.to_numpy(float)).all()
        assert (roofline_time(rows, CEIL) > 0).all()
    assert (OpPrior.for_device("H100-SXM").seconds(stepped, name) > 0).all()
    fwd, bwd = _build(cases[0], torch.device("cpu"))
    out = fwd()
    if bwd is not None:
        assert out is not None
        bwd()


def test_the_step_model_composes_exactly_the_in_step_families() -> None:
    from autotune.portfolio import baseline_configs

    pred = StepPredictor(StepModels("fp", "cpu", CEIL)).predict(baseline_configs(WORKLOAD)[0])
    assert set(STEP_FAMILIES) <= set(pred.breakdown)
    assert all(FAMILY[f].swept for f in STEP_FAMILIES)


@pytest.mark.parametrize(("case", "flops", "nbytes"), [
    # 2 m n k per matmul; operands read, result written once, fp32
    ({"family": "gemm", "op": "linear", "pass": "fwd", "dtype": "fp32", "m": 8, "n": 4, "k": 2},
     2 * 8 * 4 * 2, (8 * 2 + 2 * 4 + 8 * 4) * 4),
    # backward: twice the forward
    ({"family": "gemm", "op": "linear", "pass": "bwd", "dtype": "bf16", "m": 8, "n": 4, "k": 2},
     2 * 2 * 8 * 4 * 2, 2 * (8 * 2 + 2 * 4 + 8 * 4) * 2),
    # causal pairs of one sequence of 3: 3 + 2 + 1 = 6; 4 flops a pair a head-dim element
    ({"family": "attention", "op": "varlen", "pass": "fwd", "dtype": "fp32", "seqlens": [3],
      "heads": 2, "kv_heads": 1, "head_dim": 4}, 4 * 6 * 2 * 4, (2 * 3 * 2 + 2 * 3 * 1) * 4 * 4),
    # swiglu: 5 flops and 3 operands an element
    ({"family": "norm", "op": "swiglu", "pass": "fwd", "dtype": "fp32", "tokens": 3, "width": 5},
     5 * 15, 15 * 4 * 3),
    ({"family": "optimizer", "op": "adamw", "pass": "step", "dtype": "fp32", "numel": 10,
      "tensors": 2}, 120, 280),
])
def test_analytic_cost_by_hand(case: dict, flops: float, nbytes: float) -> None:
    assert analytic_cost(case) == (flops, nbytes)
