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
import time
from pathlib import Path

from autotune.cli._common import WORKLOAD_PRESETS, non_negative_int, positive_float, positive_int
from autotune.config import RunConfig


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
    # What the shared helpers of `autotune run` read, fixed for workers.
    p.set_defaults(func=worker, resume=None, pareto=False, predicted_trials=3000, seed=0)


def worker(args: argparse.Namespace) -> int:
    from autotune.cli.predict_cmd import load_models
    from autotune.cli.run_cmd import _candidates, _space, _workload
    from autotune.data import load_lengths
    from autotune.measure import measure
    from autotune.portfolio import baseline_configs, ladder_fits
    from autotune.rundir import validate_name
    from autotune.scaleout import SharedStudy, next_pick, work
    from autotune.search import Ranker, ReplaySource, storage_errors

    # Study names reach the storage's tables and the reports' folder names alike.
    validate_name(args.study, "study name")
    wl, user_rc = _workload(args)
    source = ReplaySource(args.replay) if args.replay else None
    # Before the models and the space: a storage out of reach is refused at once.
    shared = SharedStudy(args.storage, args.study, heartbeat_s=args.heartbeat, grace_s=args.grace)
    models = load_models(args.models, wl.hardware)
    # The longest sequence the data really holds, as `autotune run` derives the space from.
    space = _space(args, wl, load_lengths(wl.data, wl.model.resolve()).max_len)
    candidates = _candidates(args, space, wl, models)
    out = Path(args.out or f"results/workers/{socket.gethostname()}-{os.getpid()}")

    def measure_one(rc: RunConfig, n: int):  # noqa: ANN202
        if source is not None:
            return source(rc, n)
        return measure(rc, steps=args.steps, warmup=args.warmup, timeout_s=args.timeout,
                       workdir=out / "trials" / f"{n:03d}", env={"AUTOTUNE_TRIAL": str(n)})

    ranker = Ranker(candidates, models, warmup=args.warmup, steps=args.steps)
    # The untuned baseline first, as `autotune run` measures it, so reports compare alike.
    first = space.canonical(user_rc or baseline_configs(wl, fits=ladder_fits(wl, models))[0])
    choose = next_pick(ranker, budget=args.budget_trials or wl.budget.trials, first=first)
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    with storage_errors(args.storage, "the shared study failed"):
        mine = work(shared, choose, measure_one, deadline=deadline)
        done = shared.snapshot().done
    ok = [t for t in done if t.ok and t.measurement.tokens_per_s]
    best = max(ok, key=lambda t: t.measurement.tokens_per_s or 0.0) if ok else None
    summary = {"measured_here": [t.n for t in mine], "study_trials": len(done),
               "config": best.rc.label() if best else None,
               "tokens_per_s": best.measurement.tokens_per_s if best else None}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"measured {len(mine)} of the study's {len(done)} trials; best so far: "
              f"{summary['config']} at {summary['tokens_per_s'] or 0:,.0f} tokens/s",
              file=sys.stderr)
    return 0 if best is not None else 1
