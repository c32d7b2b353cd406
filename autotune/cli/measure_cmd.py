"""``autotune measure RUNCONFIG``: measure a config for real, in an isolated process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autotune.cli._common import (
    add_launch_args,
    launch_from_args,
    load_runconfig,
    non_negative_int,
    positive_float,
    positive_int,
    print_json,
)

# The keys a caller can rely on, in the order they are printed.
SUMMARY_KEYS = ("status", "reason", "tokens_per_s", "step_time_s", "step_time_iqr_s",
                "peak_mem_bytes", "peak_rss_bytes", "mfu", "mfu_peak_source",
                "model_tflops_per_step", "rank_imbalance")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("measure", help="measure a RunConfig's throughput and memory for real")
    p.add_argument("runconfig", help="RunConfig YAML")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=non_negative_int, default=1,
                   help="discarded steps before timing (default 1)")
    p.add_argument("--timeout", type=positive_float, default=900.0,
                   help="seconds before the trial counts as hung (default 900)")
    p.add_argument("--out", help="folder for config.yaml, metrics.json and log.txt")
    p.add_argument("--json", action="store_true", help="print the measurement as JSON")
    add_launch_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autotune.measure import measure

    rc, _ = load_runconfig(args.runconfig)
    launch = launch_from_args(rc, args)
    if args.out:
        # The user's own folder: one that cannot be written is this command's error (one
        # line, exit 1) before anything runs, where a search records it as a failed trial.
        from autotune.config import save_yaml

        Path(args.out).mkdir(parents=True, exist_ok=True)
        save_yaml(rc, Path(args.out) / "config.yaml")
    print(f"measuring {rc.label()}: {args.warmup} warm-up + {args.steps} timed steps on "
          f"{launch.world} rank(s) in a separate process tree ...", file=sys.stderr)
    m = measure(rc, steps=args.steps, warmup=args.warmup, timeout_s=args.timeout,
                workdir=Path(args.out) if args.out else None, launch=launch)
    data = m.to_json_dict()
    # Lifted to the top level: the multi-rank figure callers look for first.
    data["rank_imbalance"] = m.extra.get("rank_imbalance")
    if args.json:
        ordered = {k: data[k] for k in SUMMARY_KEYS} | {k: v for k, v in data.items()
                                                       if k not in SUMMARY_KEYS}
        print_json(ordered)
    elif m.status.value == "COMPLETE":
        print(f"{rc.label()}: {m.tokens_per_s:,.0f} tokens/s (effective), step "
              f"{m.step_time_s:.3f} s median (IQR {m.step_time_iqr_s:.3f} s), peak tensor "
              f"memory {m.peak_mem_bytes / 2**20:,.0f} MiB, MFU {m.mfu:.1%}")
    else:
        print(f"{rc.label()}: {m.status.value}: {m.reason}")
    return 0 if m.status.value == "COMPLETE" else 1
