"""How well the step model predicts measured steps: the configs of ``suites.step_dataset``,
each predicted from its own global batches, against what ``autotune measure`` saw.

    python -m suites.step_model_eval [--dataset results/step_dataset/measurements.parquet]
                                     [--out results/step_model]

Today this judges the compute part alone under the analytic prior (roofline on this machine's
measured ceilings), single-rank configs only, so that the learned models and the
communication terms that follow have a baseline to beat.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import RunConfig
from autotune.data import global_batches, load_dataset, make_policy
from autotune.step_ops import step_op_rows
from cost_models.features import Ceilings
from cost_models.step import compute_breakdown
from profilers.ceilings import copy_bandwidth, matmul_ceiling
from profilers.store import atomic_write_text
from suites._report import md_table


def predict_config(rc: RunConfig, ceilings: Ceilings, *, warmup: int, steps: int,
                   models: dict | None = None) -> dict:
    """Predicted seconds per step, averaged over the global batches the measurement timed
    (the trainer's stream after its warm-up steps)."""
    dims = rc.workload.model.resolve()
    data = load_dataset(rc.workload.data, dims)
    policy = make_policy(rc, dims, data_max_len=data.max_len)
    stream = global_batches(data.lengths, global_batch_tokens=rc.workload.budget.global_batch_tokens,
                            seed=rc.seed)
    for _ in range(warmup):
        next(stream)
    totals, tokens = [], 0
    for _ in range(steps):
        ids = next(stream)
        plan = policy.plan_ranks(data.lengths[ids], 1)[0]
        totals.append(compute_breakdown(step_op_rows(rc, plan, dims), ceilings, models))
        tokens += int(data.lengths[ids].sum())
    breakdown = pd.DataFrame(totals).mean().to_dict()
    step = sum(breakdown.values())
    return {"predicted_step_s": step, "predicted_tokens_per_s": tokens / steps / step,
            **{f"pred_{k}_s": v for k, v in breakdown.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.step_model_eval", description=__doc__)
    p.add_argument("--dataset", default="results/step_dataset/measurements.parquet")
    p.add_argument("--out", default="results/step_model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--profiles", help="a profile store: also predict with per-family models fitted on it")
    args = p.parse_args(argv)
    table = pd.read_parquet(args.dataset)
    table = table[(table.status == "COMPLETE") & (table.world == 1)]
    variants: dict[str, tuple[dict | None, Ceilings | None]] = {"prior only, compute": (None, None)}
    if args.profiles:
        from cost_models.fit import fit_all
        from profilers.store import ProfileStore

        models, store_ceilings = fit_all(ProfileStore.existing(args.profiles))
        variants["per-family models, compute"] = (models, store_ceilings)
    ceilings: dict[str, float] = {}
    rows = []
    for rec in table.itertuples():
        rc = RunConfig.model_validate_json(rec.config_json)
        dtype = rc.precision.dtype
        if dtype not in ceilings:
            ceilings[dtype] = matmul_ceiling(dtype, "cpu").flops_per_s
        measured = Ceilings(dict(ceilings), copy_bandwidth("cpu").bytes_per_s, source="measured")
        for name, (models, ceil) in variants.items():
            pred = predict_config(rc, ceil or measured, warmup=args.warmup, steps=args.steps,
                                  models=models)
            rows.append({"model": name, "label": rec.label, "policy": rec.policy,
                         "dtype": rec.dtype, "measured_step_s": rec.step_time_s,
                         "measured_tokens_per_s": rec.tokens_per_s, **pred})
    frame = pd.DataFrame(rows)
    frame["ape"] = (frame.predicted_step_s - frame.measured_step_s).abs() / frame.measured_step_s
    summary = pd.DataFrame([{
        "model": name, "configs": len(g), "step_time_mape": g.ape.mean(),
        "median_ratio_measured_over_predicted": float(np.median(g.measured_step_s
                                                                / g.predicted_step_s)),
        "kendall_tau_tokens_per_s": g[["predicted_tokens_per_s", "measured_tokens_per_s"]]
        .corr(method="kendall").iloc[0, 1]} for name, g in frame.groupby("model", sort=False)]
    ).set_index("model")
    out = Path(args.out)
    atomic_write_text(out / "eval.csv", frame.to_csv(index=False))
    atomic_write_text(out / "eval.md", md_table(summary, {c: ".3f" for c in summary.columns
                                                          if c != "configs"}) + "\n")
    print(summary.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
