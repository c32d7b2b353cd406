"""Repeatability of the op-family sweeps: the same family swept twice, independently, on the
same machine, compared shape by shape.

    python -m suites.profile_repeat [--families gemm] [--rounds 2] [--out results/profiling]

Each round is a fresh ``autotune profile`` into its own empty store (its own processes, its
own warm-up), one after the other. For every case the ratio of the two medians is taken;
reported are the median, p90 and max of |log ratio| over the cases, per family, with the
samples' own spread (IQR/median) and the share of CPU other processes used during the
timed windows, so that a poor figure can be told apart from a busy machine; and the same
for the medians scaled to the machine's reference speed by the canary matmul timed before
every window (``median_at_reference_s``), which removes the drift of the whole machine
between the two sweeps.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from profilers.ops import pool_windows
from profilers.store import ProfileStore, atomic_write_text
from suites._report import md_table


def sweep_round(families: str, out: Path, workload: str, extra: list[str]) -> pd.DataFrame:
    subprocess.run([sys.executable, "-m", "autotune", "profile", "--families", families,
                    "--workload", workload, "--out", str(out), "--json", *extra], check=True,
                   stdout=subprocess.DEVNULL)
    store = ProfileStore.existing(out)
    return pd.concat([pool_windows(store.load(f)) for f in families.split(",")], ignore_index=True)


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    ok = lambda t: t[t.status == "COMPLETE"].set_index("key")  # noqa: E731
    a, b = ok(a), ok(b)
    both = a.index.intersection(b.index)
    frame = pd.DataFrame({
        "family": a.loc[both, "family"], "op": a.loc[both, "op"], "pass": a.loc[both, "pass"],
        "log_ratio": np.log(a.loc[both, "median_s"] / b.loc[both, "median_s"]),
        "log_ratio_at_reference": np.log(a.loc[both, "median_at_reference_s"]
                                         / b.loc[both, "median_at_reference_s"]),
        "canary_ratio_a": a.loc[both, "canary_ratio"], "canary_ratio_b": b.loc[both, "canary_ratio"],
        "rel_iqr": np.maximum(a.loc[both, "iqr_s"] / a.loc[both, "median_s"],
                              b.loc[both, "iqr_s"] / b.loc[both, "median_s"]),
        "foreign_cpu": np.maximum(a.loc[both, "foreign_cpu"], b.loc[both, "foreign_cpu"]),
    })
    frame["abs_log_ratio"] = frame.log_ratio.abs()
    frame["abs_log_ratio_at_reference"] = frame.log_ratio_at_reference.abs()
    return frame


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    g = frame.groupby("family")
    return pd.DataFrame({
        "cases": g.size(),
        "median_abs_log_ratio": g.abs_log_ratio.median(),
        "p90_abs_log_ratio": g.abs_log_ratio.quantile(0.9),
        "max_abs_log_ratio": g.abs_log_ratio.max(),
        "median_abs_log_ratio_at_reference": g.abs_log_ratio_at_reference.median(),
        "p90_abs_log_ratio_at_reference": g.abs_log_ratio_at_reference.quantile(0.9),
        "sweep_speed_ratio": np.exp(g.log_ratio.median()),
        "canary_ratio_a": g.canary_ratio_a.median(), "canary_ratio_b": g.canary_ratio_b.median(),
        "median_rel_iqr": g.rel_iqr.median(),
        "max_foreign_cpu": g.foreign_cpu.max(),
    })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.profile_repeat")
    p.add_argument("--families", default="gemm")
    p.add_argument("--workload", default="tiny")
    p.add_argument("--windows", type=int, help="passed to autotune profile")
    p.add_argument("--min-time-s", type=float, help="passed to autotune profile")
    p.add_argument("--out", default="results/profiling")
    args = p.parse_args(argv)
    extra = [f"--windows={args.windows}"] if args.windows else []
    extra += [f"--min-time-s={args.min_time_s}"] if args.min_time_s else []
    with tempfile.TemporaryDirectory() as tmp:
        first = sweep_round(args.families, Path(tmp) / "a", args.workload, extra)
        second = sweep_round(args.families, Path(tmp) / "b", args.workload, extra)
    frame = compare(first, second)
    table = summarize(frame)
    out = Path(args.out)
    atomic_write_text(out / "repeatability.csv", frame.to_csv())
    fmt = {c: ".4f" for c in table.columns if c != "cases"}
    atomic_write_text(out / "repeatability.md", md_table(table, fmt) + "\n")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
