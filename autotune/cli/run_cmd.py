"""``autotune run``: tune a workload. The step model prices every valid candidate, the best
predicted are measured for real a few at a time (each round's measurements recalibrate the
model), and the best *measured* config is handed back with a report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from autotune.cli._common import (
    WORKLOAD_PRESETS,
    load_workload,
    non_negative_int,
    positive_float,
    positive_int,
)
from autotune.config import RunConfig, Workload
from autotune.errors import UserError

DEFAULT_BUDGET_S = 480.0  # `autotune run` with no arguments ends within 10 minutes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="tune a workload and write a run directory")
    p.add_argument("--workload", default="tiny",
                   help=f"a Workload YAML, a RunConfig YAML (its knobs become your baseline in "
                        f"the report) or a preset ({', '.join(WORKLOAD_PRESETS)}); default tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override the workload's device")
    p.add_argument("--gpus", type=positive_int, help="CUDA devices per node (implies --device cuda)")
    p.add_argument("--nproc", type=positive_int, help="processes (ranks) per node")
    p.add_argument("--budget-trials", type=positive_int,
                   help="real measurements at most (default the workload's budget.trials)")
    p.add_argument("--budget-s", type=positive_float,
                   help=f"seconds of measuring at most (default {DEFAULT_BUDGET_S:.0f}; "
                        f"the search stops at whichever budget ends first)")
    p.add_argument("--batch", type=positive_int, default=3,
                   help="candidates measured per round between recalibrations (default 3)")
    p.add_argument("--models", help="fitted models (default models/ when present, else the "
                                    "analytic prior on this machine's measured ceilings)")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per trial")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="warm-up steps per trial")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per trial")
    p.add_argument("--out", help="run directory (default results/runs/<run-id>)")
    p.add_argument("--resume", metavar="RUNDIR", help="continue the run in RUNDIR")
    p.add_argument("--storage", help="Optuna storage URL of the measured trials "
                                     "(default sqlite:///RUNDIR/study.db)")
    p.add_argument("--replay", action="append", metavar="TABLE",
                   help="answer measurements from a recorded table instead of running them")
    p.add_argument("--plan-only", action="store_true",
                   help="predict only: rank the space without measuring (every figure predicted)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _workload(args: argparse.Namespace) -> tuple[Workload, RunConfig | None]:
    """The workload to tune, and the user's own config when a RunConfig was given."""
    from autotune.config import load_yaml

    user_rc = None
    path = Path(args.workload)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        import yaml

        try:
            keys = set(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError:
            keys = set()
        if keys & {"schedule", "parallel", "checkpointing", "precision", "kernels"}:
            user_rc = load_yaml(RunConfig, path)
            wl = user_rc.workload
        else:
            wl = load_workload(args.workload)
    else:
        wl = load_workload(args.workload)
    hw = wl.hardware.model_dump()
    if args.gpus:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < args.gpus and not args.plan_only:
            raise UserError(f"--gpus {args.gpus}: this machine has {have} CUDA device(s); add "
                            f"--plan-only to plan for them from the models alone (every figure "
                            f"predicted), or tune on CPU ranks with --device cpu --nproc N")
        hw.update(device="cuda", devices_per_node=args.gpus)
    if args.device:
        hw["device"] = args.device
    if args.nproc:
        hw["devices_per_node"] = args.nproc
    wl = wl.model_copy(update={"hardware": type(wl.hardware).model_validate(hw)})
    if user_rc is not None:
        user_rc = user_rc.model_copy(update={"workload": wl})
    return wl, user_rc


def _run_dir(args: argparse.Namespace, wl: Workload):  # noqa: ANN202
    from autotune.rundir import RunDir, validate_name

    if args.resume:
        path = Path(args.resume)
        if not (path / "workload.yaml").is_file() or not (path / "run.json").is_file():
            raise UserError(f"--resume {path}: not a run directory (no workload.yaml and "
                            f"run.json); start one with `autotune run --out {path}`")
        return RunDir(path), True
    if args.out:
        out = Path(args.out)
        validate_name(out.name)
        if (out / "run.json").is_file():
            return RunDir(out), True  # the same command again continues the run
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} exists, is not empty and is not a run directory")
        out.mkdir(parents=True, exist_ok=True)
        return RunDir(out), False
    return RunDir.create(Path("results/runs"), f"{wl.model.label()}-{wl.data.label()}"), False


def run(args: argparse.Namespace) -> int:
    from autotune.cli.predict_cmd import load_models
    from autotune.config import SearchSpace, load_yaml
    from autotune.data import load_dataset
    from autotune.launch import Launch
    from autotune.measure import measure
    from autotune.portfolio import baseline_configs
    from autotune.predict import StepPredictor
    from autotune.report import render_report
    from autotune.rundir import validate_name
    from autotune.search import ReplaySource, Trial, TrialLog, guided_search

    wl, user_rc = _workload(args)
    if args.out:
        validate_name(Path(args.out).name)
    if not args.replay and not args.plan_only:
        Launch.for_config(baseline_configs(wl)[0])  # refuse what this machine cannot host
    if args.resume:
        _run_dir(args, wl)  # refuses what is not a run before any work
        wl = load_yaml(Workload, Path(args.resume) / "workload.yaml")
    dataset = load_dataset(wl.data, wl.model.resolve())
    models = load_models(args.models, wl.hardware.device)
    candidates = list(SearchSpace().grid(wl))
    if not candidates:
        raise UserError(f"no valid config of the search space fits {wl.world_size} device(s) "
                        f"of this workload")
    predicted = StepPredictor(models, warmup=args.warmup, steps=args.steps).predict_many(candidates)
    cap = wl.budget.memory_cap_gb * 2**30
    if predicted.peak_mem_bytes.min() > cap:
        raise UserError(f"the workload cannot fit in memory_cap_gb={wl.budget.memory_cap_gb}: the "
                        f"smallest predicted peak of {len(candidates)} candidates is "
                        f"{predicted.peak_mem_bytes.min() / 2**30:.2f} GiB")
    source = ReplaySource(args.replay) if args.replay else None
    log = TrialLog(args.storage) if args.storage else None  # an unreachable URL: before any file
    rundir, resumed = _run_dir(args, wl)
    if args.plan_only:
        return _plan_only(args, rundir, candidates, predicted, models.calibration)
    storage = args.storage or f"sqlite:///{(rundir.path / 'study.db').resolve()}"
    log = log or TrialLog(storage)
    if not resumed:
        rundir.write_workload(wl)
        rundir.write_text("run.json", json.dumps({"storage": storage, "models": args.models,
                                                  "replay": args.replay}, indent=2) + "\n")
    done = log.trials()
    budget = args.budget_trials or wl.budget.trials
    deadline = time.monotonic() + (args.budget_s or DEFAULT_BUDGET_S)
    bar = tqdm(total=budget, initial=len(done), unit="trial", desc="measuring", disable=None)

    def measure_one(rc: RunConfig, n: int):  # noqa: ANN202
        bar.set_postfix_str(rc.label())
        if source is not None:
            return source(rc, n)
        return measure(rc, steps=args.steps, warmup=args.warmup, timeout_s=args.timeout,
                       workdir=rundir.trial_dir(n))

    def record(trial: Trial) -> None:
        log.add(trial)  # committed before the next trial starts: a kill loses nothing done
        rundir.write_trial(trial.n, trial.rc, trial.measurement)
        bar.update()

    # The baseline users run without tuning (their own config when they gave one) is
    # always measured, first, so the report can say what tuning bought.
    baseline = SearchSpace().canonical(user_rc or baseline_configs(wl)[0])
    if not any(t.rc.model_dump_json() == baseline.model_dump_json() for t in done):
        trial = Trial(len(done), baseline, measure_one(baseline, len(done)))
        record(trial)
        done.append(trial)
    trials = guided_search(candidates, models, measure_one, budget=budget, batch=args.batch,
                           done=done, on_trial=record, warmup=args.warmup, steps=args.steps,
                           deadline=deadline)
    bar.close()
    ok = [t for t in trials if t.ok]
    best = max(ok, key=lambda t: t.measurement.tokens_per_s) if ok else None
    if best is not None:
        rundir.write_tuned(best.rc)
    tuples = [(t.n, t.rc, t.measurement) for t in trials]
    report = render_report(workload_rc=baseline, dataset=dataset, trials=tuples,
                           best=(best.n, best.rc, best.measurement) if best else None)
    report += "\n" + _predicted_vs_measured(trials, models.calibration)
    rundir.write_text("report.md", report)
    summary = {"run_dir": str(rundir.path), "tuned": str(rundir.path / "tuned.yaml") if best else None,
               "config": best.rc.label() if best else None,
               "tokens_per_s": best.measurement.tokens_per_s if best else None,
               "measured_trials": len(trials), "candidates": len(candidates)}
    rundir.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    elif best is not None:
        print(f"tuned: {best.rc.label()} at {best.measurement.tokens_per_s:,.0f} tokens/s "
              f"(measured; {len(trials)} of {len(candidates)} candidates measured); report: "
              f"{rundir.path / 'report.md'}")
    else:
        print(f"no candidate completed; see {rundir.path / 'report.md'}", file=sys.stderr)
    return 0 if best is not None else 1


def _predicted_vs_measured(trials: list, calibration: str) -> str:
    from autotune.calibrate import canary_drift

    lines = ["## Predicted against measured", "",
             f"Predictions made before each candidate was measured ({calibration} models, "
             f"recalibrated on the measurements of earlier rounds). Both at the machine's "
             f"reference speed: a measurement is scaled by the canary matmul timed around it, "
             f"as the models were fitted.", "",
             "| # | config | predicted tokens/s | measured tokens/s | measured / predicted |",
             "|---|---|---:|---:|---:|"]
    for t in trials:
        drift = canary_drift(t.measurement.extra)
        pred = t.predicted_tokens_per_s
        meas = t.measurement.tokens_per_s * drift if t.measurement.tokens_per_s else None
        ratio = f"{meas / pred:.2f}" if pred and meas else "-"
        lines.append(f"| {t.n} | `{t.rc.label()}` | {pred:,.0f} | " if pred else
                     f"| {t.n} | `{t.rc.label()}` | - | ")
        lines[-1] += f"{meas:,.0f} | {ratio} |" if meas else f"{t.measurement.status.value} | - |"
    return "\n".join(lines) + "\n"


def _plan_only(args: argparse.Namespace, rundir, candidates: list, predicted, calibration: str  # noqa: ANN001
               ) -> int:
    cap_ok = predicted.peak_mem_bytes <= candidates[0].workload.budget.memory_cap_gb * 2**30 * 0.9
    order = predicted[cap_ok].sort_values("tokens_per_s", ascending=False).index[:5]
    lines = ["# autotune plan (predicted, nothing measured)", "",
             f"{len(candidates)} candidates priced by the step model ({calibration}); every "
             f"figure below is a prediction.", "",
             "| rank | config | predicted tokens/s | predicted peak GiB |", "|---|---|---:|---:|"]
    for r, i in enumerate(order, 1):
        lines.append(f"| {r} | `{candidates[i].label()}` | {predicted.tokens_per_s[i]:,.0f} | "
                     f"{predicted.peak_mem_bytes[i] / 2**30:.2f} |")
    rundir.write_text("plan.md", "\n".join(lines) + "\n")
    if len(order):
        rundir.write_tuned(candidates[order[0]])
    result = {"run_dir": str(rundir.path), "predicted": True,
              "config": candidates[order[0]].label() if len(order) else None,
              "predicted_tokens_per_s": float(predicted.tokens_per_s[order[0]]) if len(order) else None}
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))
    return 0
