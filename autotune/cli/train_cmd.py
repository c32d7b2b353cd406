"""``autotune train RUNCONFIG``: train with the reference trainer and log loss and throughput."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from autotune.cli._common import (
    add_launch_args,
    launch_from_args,
    load_runconfig,
    positive_int,
    print_json,
)
from profilers.isolation import guarded


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a RunConfig with the reference trainer")
    p.add_argument("runconfig", help="RunConfig YAML")
    p.add_argument("--steps", type=positive_int, default=20, help="optimizer steps (default 20)")
    p.add_argument("--log-every", type=positive_int, default=10,
                   help="log a line every K steps when no progress bar is shown")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    add_launch_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rc, dataset = load_runconfig(args.runconfig)
    launch = launch_from_args(rc, args)
    if launch.world == 1:
        from autotune.train.distributed import ParallelContext, init_parallel
        from autotune.train.worker import train_loop

        ctx: ParallelContext = init_parallel(rc)
        summary, _ = train_loop(rc, ctx, steps=args.steps, log_every=args.log_every, fault=None)
    else:
        with tempfile.TemporaryDirectory(prefix="autotune-train-") as tmp:
            out = Path(tmp) / "summary.json"
            argv = launch.argv("autotune.train.worker", [
                args.runconfig, "--mode", "train", "--steps", str(args.steps),
                "--log-every", str(args.log_every), "--out", str(out)])
            code = subprocess.run(guarded(argv), check=False).returncode
            if code != 0 or not out.is_file():
                print(f"autotune: training failed (launcher exit code {code})", file=sys.stderr)
                return 1
            summary = json.loads(out.read_text())
    if summary is None:  # not the node holding rank 0 of a multi-node run
        return 0
    if args.json:
        print_json(summary)
    else:
        print(f"{summary['config']}: {summary['steps']} steps on {summary['ranks']} rank(s), "
              f"final loss {summary['final_loss']:.4f}, {summary['tokens_per_s']:,.0f} tokens/s")
    return 0
