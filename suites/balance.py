"""Rank balancing: Skrull's compute-balanced split against the arrival-order split.

    python -m suites.balance [--batches 200] [--repeats 2] [--steps 5] [--out results/balance]

Estimated: over many global batches of the default long-tail workload, the max/mean of the
estimated training FLOPs per data-parallel rank (2 ranks) when each policy deals sequences
by estimated compute (longest first onto the least-loaded rank) or in arrival order (what a
distributed sampler does). Measured: the same two splits trained for real on 2 gloo ranks,
with each replica's forward/backward time before the gradient reduction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import RunConfig, Workload
from autotune.data import global_batches, load_dataset
from autotune.data.cost import plan_flops
from autotune.data.policies import POLICY_CLASSES
from autotune.measure import measure
from profilers.progress import progress
from profilers.store import atomic_write_text
from suites._report import host_line

RANKS = 2
SPLITS = ("balanced", "arrival")
POLICIES = {"skrull": {"micro_batch_tokens": 2048}, "pack": {"micro_batch_tokens": 2048}}


def _rc(policy: str, split: str) -> RunConfig:
    return RunConfig.model_validate({
        "workload": {"hardware": {"devices_per_node": RANKS}},
        "schedule": {"policy": policy, "rank_split": split, **POLICIES[policy]},
        "parallel": {"dp": RANKS}})


def estimated(batches: int) -> pd.DataFrame:
    wl = Workload()
    dims = wl.model.resolve()
    data = load_dataset(wl.data, dims)
    rows = []
    for policy in POLICIES:
        for split in SPLITS:
            rc = _rc(policy, split)
            pol = POLICY_CLASSES[policy](rc.schedule, dims, data_max_len=data.max_len)
            stream = global_batches(data.lengths, global_batch_tokens=8192, seed=rc.seed)
            for step in range(batches):
                ids = next(stream)
                load = np.array([plan_flops(p, dims) for p in pol.plan_ranks(data.lengths[ids], RANKS)])
                rows.append({"policy": policy, "split": split, "step": step,
                             "imbalance": load.max() / load.mean()})
    return pd.DataFrame(rows)


def measured(repeats: int, steps: int, warmup: int) -> pd.DataFrame:
    jobs = [(r, split) for r in range(repeats) for split in SPLITS]
    rows = []
    for r, split in progress(jobs, desc="measured", unit="trial"):
        m = measure(_rc("skrull", split), steps=steps, warmup=warmup, timeout_s=1800)
        rows.append({"split": split, "repeat": r, "status": m.status.value,
                     "tokens_per_s": m.tokens_per_s,
                     "imbalance_measured": m.extra.get("rank_imbalance"),
                     "imbalance_estimated": m.extra.get("rank_imbalance_estimated"),
                     "replica_compute_s": m.extra.get("rank_compute_s"), "reason": m.reason})
    return pd.DataFrame(rows)


def render(est: pd.DataFrame, meas: pd.DataFrame, args: argparse.Namespace, env: str) -> str:
    g = est.groupby(["policy", "split"])["imbalance"]
    lines = [
        "# Rank balancing: compute-balanced against arrival-order split", "",
        f"CPU figures ({env}), `python -m suites.balance --batches {args.batches} --repeats "
        f"{args.repeats} --steps {args.steps}`: default workload (llama-tiny, longsft, 8,192 "
        f"tokens per global batch), {RANKS} data-parallel ranks.", "",
        f"## Estimated max/mean FLOPs per rank over {args.batches} global batches", "",
        "| policy | split | median | p90 | max |", "|---|---|---:|---:|---:|"]
    for (policy, split), s in g:
        lines.append(f"| {policy} | {split} | {s.median():.3f} | {s.quantile(0.9):.3f} | "
                     f"{s.max():.3f} |")
    lines += ["", "## Measured on 2 gloo ranks (skrull)", "",
              "| split | runs | tokens/s median | measured imbalance (median of runs) | "
              "estimated imbalance |", "|---|---:|---:|---:|---:|"]
    ok = meas[meas.status == "COMPLETE"]
    for split in SPLITS:
        s = ok[ok.split == split]
        if s.empty:
            lines.append(f"| {split} | 0 | - | - | - |")
            continue
        lines.append(f"| {split} | {len(s)} | {s.tokens_per_s.median():,.0f} | "
                     f"{s.imbalance_measured.median():.3f} "
                     f"({s.imbalance_measured.min():.3f}-{s.imbalance_measured.max():.3f}) | "
                     f"{s.imbalance_estimated.median():.3f} |")
    lines += ["", "Measured imbalance: per timed step, the slowest replica's forward/backward "
              "time (before the gradient reduction) over the mean; median over steps. Two "
              "ranks share two cores here, one thread each, so timing noise is a few percent.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.balance", description=__doc__)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="results/balance")
    args = p.parse_args(argv)
    est = estimated(args.batches)
    meas = measured(args.repeats, args.steps, args.warmup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "estimated.csv", est.to_csv(index=False))
    atomic_write_text(out / "measured.csv", meas.to_csv(index=False))
    report = render(est, meas, args, host_line())
    atomic_write_text(out / "README.md", report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
