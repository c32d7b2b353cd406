"""Input-aware (Mimose) checkpointing against none and full, on a workload whose micro-batches
vary in size.

    python -m suites.adaptive_ckpt [--policy sorted] [--micro-batch-size 8] [--budget-gb 0.6]
                                   [--repeats 3] [--steps 3] [--out results/adaptive_checkpointing]

Each repeat measures the three checkpointing policies back to back (interleaved, so machine
drift hits all alike) with ``autotune measure``; peak memory is the tracked tensor peak of
the heaviest timed step. Reported: median tokens/s (with min-max), median peak, whether the
budget held, and adaptive's throughput over full's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from autotune.config import RunConfig
from autotune.measure import measure
from profilers.progress import progress
from profilers.store import atomic_write_text
from suites._report import host_line, md_table


def configs(policy: str, mbs: int, budget_gb: float) -> dict[str, RunConfig]:
    base = {"schedule": {"policy": policy, "micro_batch_size": mbs}}
    return {name: RunConfig.model_validate(base | {"checkpointing": ck}) for name, ck in (
        ("none", {"policy": "none"}),
        ("full", {"policy": "full"}),
        (f"adaptive {budget_gb:g} GB", {"policy": "adaptive", "memory_budget_gb": budget_gb}))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.adaptive_ckpt", description=__doc__)
    p.add_argument("--policy", default="sorted", choices=["sorted", "pad-batch"])
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--budget-gb", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="results/adaptive_checkpointing")
    args = p.parse_args(argv)
    rcs = configs(args.policy, args.micro_batch_size, args.budget_gb)
    rows = []
    with progress(total=args.repeats * len(rcs), desc="measuring", unit="run") as bar:
        for r in range(args.repeats):
            for name, rc in rcs.items():
                m = measure(rc, steps=args.steps, warmup=args.warmup, timeout_s=900)
                rows.append({"checkpointing": name, "repeat": r, "status": m.status.value,
                             "tokens_per_s": m.tokens_per_s, "peak_mem_bytes": m.peak_mem_bytes,
                             "recomputed_tokens_per_step": m.extra.get("recomputed_tokens_per_step")})
                bar.update()
    frame = pd.DataFrame(rows)
    ok = frame[frame.status == "COMPLETE"]
    g = ok.groupby("checkpointing", sort=False)
    summary = pd.DataFrame({
        "runs": g.size(),
        "tokens_per_s": g.tokens_per_s.median(),
        "tokens_per_s_min": g.tokens_per_s.min(),
        "tokens_per_s_max": g.tokens_per_s.max(),
        "peak_mem_gb": g.peak_mem_bytes.max() / 1e9,
    })
    summary.index.name = "checkpointing"
    adaptive = next(n for n in rcs if n.startswith("adaptive"))
    summary["within_budget"] = summary.peak_mem_gb <= args.budget_gb
    summary["tokens_per_s_over_full"] = summary.tokens_per_s / summary.at["full", "tokens_per_s"]
    out = Path(args.out)
    atomic_write_text(out / "runs.csv", frame.to_csv(index=False))
    text = (f"# Adaptive checkpointing, {args.policy} micro_batch_size={args.micro_batch_size}, "
            f"budget {args.budget_gb:g} GB\n\nCPU measurements ({host_line()}), float32, "
            f"{args.repeats} interleaved repeats of {args.warmup} warm-up + {args.steps} timed "
            f"steps; peak = tracked tensor bytes of the heaviest timed step (max over repeats).\n\n"
            + md_table(summary, {"tokens_per_s": ",.0f", "tokens_per_s_min": ",.0f",
                                 "tokens_per_s_max": ",.0f", "peak_mem_gb": ".3f",
                                 "tokens_per_s_over_full": ".3f"}) + "\n")
    atomic_write_text(out / "README.md", text)
    print(text)
    held = bool(summary.at[adaptive, "within_budget"]) if adaptive in summary.index else False
    print(f"adaptive: budget {'held' if held else 'NOT held'}; "
          f"{summary.at[adaptive, 'tokens_per_s_over_full']:.2f}x full's tokens/s"
          if adaptive in summary.index else "adaptive did not complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
