"""``autotune run``: tune a workload. The step model prices every valid candidate, the best
predicted are measured for real a few at a time (each round's measurements recalibrate the
model), and the best *measured* config is handed back with a report. The loop itself lives
in ``autotune.tune``; this module parses the flags and prints."""

from __future__ import annotations

import argparse
import json
import sys

from autotune.cli._common import (
    WORKLOAD_PRESETS,
    non_negative_int,
    positive_float,
    positive_int,
)
from autotune.tune.run import DEFAULT_BUDGET_S, MAX_PRICED
from autotune.tune.strategies import STRATEGIES


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
                   help=f"seconds of measuring at most (default: what the trial budget needs "
                        f"at the best candidates' predicted step time, at least "
                        f"{DEFAULT_BUDGET_S:.0f}; the search stops at whichever budget ends "
                        f"first)")
    p.add_argument("--batch", type=positive_int, default=3,
                   help="candidates measured per round between recalibrations (default 3)")
    p.add_argument("--models", help="fitted models (default models/ when present, else the "
                                    "analytic prior on this machine's measured ceilings; "
                                    "'prior' for the prior even then)")
    p.add_argument("--space", metavar="FILE",
                   help="a SearchSpace YAML: the choices per knob (default the built-in space)")
    _search_args(p)
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per trial")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="warm-up steps per trial")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per trial")
    p.add_argument("--out", help="run directory (default results/runs/<run-id>)")
    p.add_argument("--resume", metavar="RUNDIR", help="continue the run in RUNDIR")
    p.add_argument("--storage", help="Optuna storage URL of the measured trials "
                                     "(default sqlite:///RUNDIR/study.db)")
    p.add_argument("--no-memory-trace", dest="memory_trace", action="store_false",
                   help="on GPUs, measure candidates without first tracing their peak memory "
                        "at real size (autotune memory); by default one traced over the cap "
                        "is recorded as out of memory without running it")
    p.add_argument("--replay", action="append", metavar="TABLE",
                   help="answer measurements from a recorded table instead of running them")
    p.add_argument("--plan-only", action="store_true",
                   help="predict only: rank the space without measuring (every figure predicted)")
    p.add_argument("--confirm", type=non_negative_int, default=5, metavar="ROUNDS",
                   help="after the search, measure the finalists (the best configs, the "
                        "baseline and each --baselines strategy's best) again, interleaved, "
                        "for at least 3 and at most ROUNDS rounds, until the best one's "
                        "bootstrap interval separates; the tuned figure is their median "
                        "(default 5; 0 reports the search's single shots)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _search_args(p: argparse.ArgumentParser) -> None:
    """How the configs to measure are chosen, and what they are judged against."""
    p.add_argument("--baselines", action="store_true",
                   help="also run, at the tuner's measurement budget: DeepSpeed-autotuner-style "
                        "ZeRO x micro-batch search, Optuna TPE on measurements only, random "
                        "search (configs one of them measured are not measured again)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the TPE and random baselines and of the predicted studies")
    p.add_argument("--strategy", choices=list(STRATEGIES), default="guided",
                   help="how the configs to measure are chosen (default guided: the cost "
                        "model ranks every candidate, recalibrated on each round's "
                        "measurements); " + "; ".join(
                            f"{name}: {cls.about}" for name, cls in STRATEGIES.items()
                            if name != "guided"))
    p.add_argument("--pareto", dest="strategy", action="store_const", const="pareto",
                   help="tune for the throughput/memory Pareto front (--strategy pareto): "
                        "NSGA-II on the predictions proposes the front, measurements spread "
                        "along it")
    p.add_argument("--predicted-trials", type=positive_int, default=3000,
                   help="predicted trials of the NSGA-II study (--pareto) or of the TPE study "
                        f"that samples a space of more than {MAX_PRICED:,} configs")


def run(args: argparse.Namespace) -> int:
    from autotune.tune.run import Options, tune

    result = tune(Options.of(args))
    if result.plan_text is not None:
        print(json.dumps(result.summary, indent=2) if args.json else result.plan_text)
        return 0
    summary = result.summary
    if args.json:
        print(json.dumps(summary, indent=2))
    elif summary.get("finalist"):
        v = summary["confirmed"][summary["finalist"]]
        print(f"tuned: {summary['config']} at {v['median']:,.0f} tokens/s (median of "
              f"{len(v['samples'])} measurements after the search, 95% interval "
              f"{v['low']:,.0f}-{v['high']:,.0f}; {summary['measured_trials']} of "
              f"{summary['candidates']} candidates measured); report: "
              f"{summary['run_dir']}/report.md")
    elif summary["config"] is not None:
        print(f"tuned: {summary['config']} at {summary['tokens_per_s']:,.0f} tokens/s "
              f"(measured; {summary['measured_trials']} of {summary['candidates']} candidates "
              f"measured); report: {summary['run_dir']}/report.md")
    else:
        print(f"no candidate completed; see {summary['run_dir']}/report.md", file=sys.stderr)
    return 0 if summary["config"] is not None else 1
