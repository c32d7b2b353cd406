"""``autotune run``: measure candidate configs for a workload and hand back the best."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from autotune.cli._common import (
    WORKLOAD_PRESETS,
    load_workload,
    non_negative_int,
    positive_float,
    positive_int,
)
from autotune.config import Workload
from autotune.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="tune a workload and write a run directory")
    p.add_argument("--workload", default="tiny",
                   help=f"a workload YAML file or a preset ({', '.join(WORKLOAD_PRESETS)}); "
                        f"default tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override the workload's device")
    p.add_argument("--gpus", type=positive_int, help="CUDA devices per node (implies --device cuda)")
    p.add_argument("--nproc", type=positive_int, help="processes (ranks) per node")
    p.add_argument("--budget-trials", type=positive_int, help="at most this many measured trials")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per trial")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="warm-up steps per trial")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per trial")
    p.add_argument("--out", help="run directory (default results/runs/<run-id>)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _workload(args: argparse.Namespace) -> Workload:
    wl = load_workload(args.workload)
    hw = wl.hardware.model_dump()
    if args.gpus:
        hw.update(device="cuda", devices_per_node=args.gpus)
    if args.device:
        hw["device"] = args.device
    if args.nproc:
        hw["devices_per_node"] = args.nproc
    return wl.model_copy(update={"hardware": type(wl.hardware).model_validate(hw)})


def run(args: argparse.Namespace) -> int:
    from autotune.data import load_dataset
    from autotune.launch import Launch
    from autotune.measure import measure
    from autotune.portfolio import baseline_configs
    from autotune.report import render_report
    from autotune.rundir import RunDir, validate_name
    from profilers.records import Status

    wl = _workload(args)
    dataset = load_dataset(wl.data, wl.model.resolve())
    candidates = baseline_configs(wl)
    trials_budget = args.budget_trials or wl.budget.trials
    candidates = candidates[:trials_budget]
    Launch.for_config(candidates[0])  # refuse what this machine cannot host, up front
    if args.out:
        out = Path(args.out)
        validate_name(out.name)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not empty")
        out.mkdir(parents=True, exist_ok=True)
        rundir = RunDir(out)
    else:
        rundir = RunDir.create(Path("results/runs"), f"{wl.model.label()}-{wl.data.label()}")
    rundir.write_workload(wl)
    trials = []
    bar = tqdm(candidates, unit="trial", desc="measuring", disable=None)
    for n, rc in enumerate(bar):
        bar.set_postfix_str(rc.label())
        if bar.disable:
            print(f"[{n + 1}/{len(candidates)}] measuring {rc.label()} ...", file=sys.stderr)
        m = measure(rc, steps=args.steps, warmup=args.warmup, timeout_s=args.timeout,
                    workdir=rundir.trial_dir(n))
        rundir.write_trial(n, rc, m)
        trials.append((n, rc, m))
    bar.close()
    done = [t for t in trials if t[2].status is Status.COMPLETE]
    best = max(done, key=lambda t: t[2].tokens_per_s) if done else None
    if best is not None:
        rundir.write_tuned(best[1])
    report = render_report(workload_rc=candidates[0], dataset=dataset, trials=trials, best=best)
    rundir.write_text("report.md", report)
    summary = {
        "run_dir": str(rundir.path),
        "tuned": best[1].label() if best else None,
        "tokens_per_s": best[2].tokens_per_s if best else None,
        "trials": [{"n": n, "config": rc.label(), "status": m.status.value,
                    "tokens_per_s": m.tokens_per_s} for n, rc, m in trials],
    }
    rundir.write_text("summary.json", json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary, indent=2))
    elif best is not None:
        print(f"tuned: {best[1].label()} at {best[2].tokens_per_s:,.0f} tokens/s; "
              f"report: {rundir.path / 'report.md'}")
    else:
        print(f"no candidate completed; see {rundir.path / 'report.md'}", file=sys.stderr)
    return 0 if best is not None else 1
