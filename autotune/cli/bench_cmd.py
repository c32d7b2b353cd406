"""``autotune bench SUITE``: MLPerf-style time to train for every contender of a suite."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from autotune.cli._common import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark suite: time to train to a quality target, "
                                     "N runs per contender, compliance-checked MLPerf logs")
    p.add_argument("suite", help="a built-in suite (smoke, longsft-cpu, ...) or a suite YAML")
    p.add_argument("--out", help="bench directory (default results/runs/bench-<suite>-<time>); "
                                 "an existing one is resumed")
    p.add_argument("--runs", type=positive_int, help="override the suite's runs per contender")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(func=run)


def _fmt(v: float | None, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def run(args: argparse.Namespace) -> int:
    from autotune.tune.rundir import validate_name
    from suites.bench import load_suite, run_suite

    if args.out:  # before any work: '..' would spread the runs into the parent folder
        validate_name(Path(args.out).name, "bench directory name")
    suite, base = load_suite(args.suite)
    if args.runs:
        suite = suite.model_copy(update={"runs": args.runs})
    out = Path(args.out) if args.out else (
        Path("results/runs") / f"bench-{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    scores = run_suite(suite, base, out)
    failed = [(name, s["failed"]) for name, s in scores["contenders"].items() if s["failed"]]
    if args.json:
        print(json.dumps({"out": str(out), **scores}, indent=2))
    else:
        print(f"suite {suite.name}: target eval loss {suite.target}, {suite.runs} runs per "
              f"contender, time limit {suite.time_limit_s:g} s")
        print(f"{'contender':<12} {'ok':>5} {'olympic mean s':>15} {'min-max s':>15} "
              f"{'tuned speedup (95% interval)':>29} {'tokens/s':>10}")
        for name, s in scores["contenders"].items():
            spread = (f"{s['min_s']:.1f}-{s['max_s']:.1f}" if s["min_s"] is not None else "-")
            print(f"{name:<12} {s['successes']:>2}/{s['runs']:<2} "
                  f"{_fmt(s['olympic_mean_s'], '.1f', 'no score'):>15} {spread:>15} "
                  f"{_speedup(s):>29} {_fmt(s['tokens_per_s_median'], ',.0f'):>10}")
        print(f"bench directory: {out} (autotune report {out})")
    if failed:
        print("runs failed (crash, timeout or a log failing the compliance check): "
              + ", ".join(f"{n} x{k}" for n, k in failed), file=sys.stderr)
        return 1
    return 0


def _speedup(s: dict) -> str:
    if s["speedup_of_tuned"] is None:
        return "-"
    low, high = s.get("speedup_low"), s.get("speedup_high")
    iv = "" if low is None else f" ({low:.2f}-{high:.2f})" if high is not None else f" (>= {low:.2f})"
    return f"{s['speedup_of_tuned']:.2f}x{iv}"
