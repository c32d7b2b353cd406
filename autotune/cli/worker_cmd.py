"""``autotune worker``: one of any number of processes, on any number of machines, that share
one study (``--storage postgresql://...``) and together measure every candidate the search
wants exactly once, each on its own devices. A worker that dies loses nothing: its claim is
released after the heartbeat grace period and another worker measures the candidate."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from autotune.cli._common import WORKLOAD_PRESETS, non_negative_int, positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="measure candidates of a study shared with other workers")
    p.add_argument("--storage", required=True,
                   help="Optuna storage URL every worker shares (postgresql://... across "
                        "machines; sqlite:///FILE for workers on one machine)")
    p.add_argument("--study", default="measured", help="study name (default measured)")
    p.add_argument("--workload", default="tiny",
                   help=f"a Workload YAML, a RunConfig YAML or a preset ({', '.join(WORKLOAD_PRESETS)}); "
                        f"every worker of a study must give the same")
    p.add_argument("--space", metavar="FILE", help="a SearchSpace YAML (default the built-in space)")
    p.add_argument("--models", help="fitted models (as `autotune run --models`)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override the workload's device")
    p.add_argument("--gpus", type=positive_int, help="CUDA devices this worker measures on")
    p.add_argument("--nproc", type=positive_int, help="processes (ranks) per measurement")
    p.add_argument("--budget-trials", type=positive_int,
                   help="measurements of the whole study at most (default the workload's budget.trials)")
    p.add_argument("--budget-s", type=positive_float, help="seconds this worker claims for at most")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per trial")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="warm-up steps per trial")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per trial")
    p.add_argument("--heartbeat", type=positive_int, default=10,
                   help="seconds between heartbeats of a measurement (default 10)")
    p.add_argument("--grace", type=positive_int,
                   help="seconds without a heartbeat before a claim is released (default 3x heartbeat)")
    p.add_argument("--out", help="this worker's trial folders (default results/workers/<host>-<pid>)")
    p.add_argument("--replay", action="append", metavar="TABLE",
                   help="answer measurements from a recorded table instead of running them")
    p.add_argument("--json", action="store_true", help="print what this worker measured as JSON")
    p.set_defaults(func=worker)


def worker(args: argparse.Namespace) -> int:
    from autotune.tune.run import Options
    from autotune.tune.workers import join

    summary = join(Options.of(args), study=args.study, heartbeat_s=args.heartbeat,
                   grace_s=args.grace, out=Path(args.out or f"results/workers/"
                                                 f"{socket.gethostname()}-{os.getpid()}"))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"measured {len(summary['measured_here'])} of the study's "
              f"{summary['study_trials']} trials; best so far: {summary['config']} at "
              f"{summary['tokens_per_s'] or 0:,.0f} tokens/s", file=sys.stderr)
    return 0 if summary["config"] is not None else 1
