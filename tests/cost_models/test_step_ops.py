"""A step's op rows counted by hand, and their sum through the prior."""

from __future__ import annotations

import pandas as pd
import pytest

from autotune.config import RunConfig, SearchSpace
from autotune.data.plan import ChunkGroup, MicroBatch, Segment, StepPlan
from autotune.profile_grid import op_cases, token_grid
from autotune.step_ops import step_op_rows
from cost_models.features import Ceilings
from cost_models.prior import roofline_time
from cost_models.step import compute_breakdown

DIMS = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96}


def _rc(**over) -> RunConfig:
    return RunConfig.model_validate({"workload": {"model": DIMS}, **over})


def _flops(frame: pd.DataFrame, **match) -> float:
    sel = frame
    for k, v in match.items():
        sel = sel[sel[k] == v]
    return float((sel.flops * sel["count"]).sum())


def test_one_packed_micro_batch_runs_six_n_t_matmul_flops() -> None:
    rc = _rc()
    dims = rc.workload.model.resolve()
    plan = StepPlan([MicroBatch((Segment(0, 0, 10, 10), Segment(1, 0, 6, 6)))])
    rows = step_op_rows(rc, plan)
    t = 16
    # Forward 2 N T and backward 4 N T over the blocks' matmul parameters.
    assert _flops(rows["gemm"]) == 6 * t * dims.layers * dims.matmul_params_per_layer()
    att = rows["attention"]
    assert len(att) == 2 and att.seqlens.map(list).tolist() == [[10, 6], [10, 6]]
    assert att["count"].tolist() == [2, 2]  # one per layer, forward and backward
    assert rows["loss"]["count"].tolist() == [1, 1]
    assert rows["optimizer"].numel.tolist() == [dims.total_params()]


def test_checkpointing_and_dropped_chunks_run_their_forward_again() -> None:
    dims = RunConfig.model_validate({"workload": {"model": DIMS}}).workload.model.resolve()
    plan = StepPlan([MicroBatch((Segment(0, 0, 16, 16),))])
    plain = step_op_rows(_rc(), plan)
    full = step_op_rows(_rc(checkpointing={"policy": "full"}), plan)
    fwd = _flops(plain["gemm"], **{"pass": "fwd"})
    assert _flops(full["gemm"], **{"pass": "fwd"}) == 2 * fwd
    assert _flops(full["gemm"], **{"pass": "bwd"}) == _flops(plain["gemm"], **{"pass": "bwd"})

    chunks = ChunkGroup((MicroBatch((Segment(0, 0, 8, 8),)), MicroBatch((Segment(0, 8, 8, 8),))),
                        keep=1)
    rows = step_op_rows(_rc(schedule={"policy": "chunkflow", "chunk_size": 8,
                                      "micro_batch_tokens": 8}), StepPlan([chunks]))
    att = rows["attention"].set_index(["op", "pass"])
    assert att.loc[("prefix", "fwd"), "prefix"] == 8  # the second chunk sees the first
    assert att.loc[("varlen", "fwd"), "count"] == 2 * dims.layers  # chunk 0: forward twice
    assert att.loc[("prefix", "fwd"), "count"] == dims.layers


def test_breakdown_is_the_counted_sum_of_the_prior() -> None:
    ceil = Ceilings({"fp32": 1e11}, 2e10)
    rows = step_op_rows(_rc(), StepPlan([MicroBatch((Segment(0, 0, 32, 32),))]))
    out = compute_breakdown(rows, ceil)
    for fam, frame in rows.items():
        assert out[fam] == pytest.approx(float((roofline_time(frame, ceil) * frame["count"]).sum()))


@pytest.mark.parametrize("tp", [1, 2])
def test_the_profile_grid_measures_every_op_a_step_prices(tp: int) -> None:
    """A micro-batch of a token count on the grid runs only gemm, norm and loss ops that the
    profiler measures: the per-family models are never asked about an op they never saw."""
    rc = _rc(workload={"model": DIMS, "hardware": {"devices_per_node": tp}}, parallel={"tp": tp})
    space = SearchSpace(tp=[tp])
    cases = op_cases(rc.workload, space, ("gemm", "norm", "loss"))
    case_keys = {k for c in cases for k in c}
    t = token_grid(space)[1]
    rows = step_op_rows(rc, StepPlan([MicroBatch((Segment(0, 0, t, t),))]))
    for family in ("gemm", "norm", "loss"):
        for row in rows[family].to_dict("records"):
            asked = {k: v for k, v in row.items() if k in case_keys and pd.notna(v)}
            assert asked in cases, asked
