"""``autotune kernels tune``: the kernel configs of a workload's shapes, tuned per family and
kept in the tuning cache the trainer reads at start-up."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autotune.cli._common import load_workload, positive_float
from autotune.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="tune kernel configs for a workload's shapes")
    ks = p.add_subparsers(dest="kernels_command", required=True, parser_class=type(p))
    t = ks.add_parser("tune", help="family tuning of every shape the workload runs")
    t.add_argument("--workload", default="tiny",
                   help="a Workload YAML, a RunConfig YAML (its shapes) or a preset; default tiny")
    t.add_argument("--kernel", action="append",
                   help="tune only this kernel (repeatable; default every kernel)")
    t.add_argument("--budget", type=positive_float, default=0.25,
                   help="share of all (shape, config) pairs measured per kernel (default 0.25)")
    t.add_argument("--min-memory-cut", type=positive_float, default=4.0,
                   help="kernels whose point is memory (linear_ce) only try configs that cut "
                        "their workspace at least this many times against the unfused op "
                        "(default 4; 1 lets speed alone decide)")
    t.add_argument("--dtype", choices=("fp32", "bf16"), help="default: the config's dtype")
    t.add_argument("--cache", help="tuning cache file (default ~/.cache/autotune/kernels/<fingerprint>.json, "
                        "which the trainer reads)")
    t.add_argument("--json", action="store_true", help="print the tuned configs as JSON")
    t.set_defaults(func=tune)


def _configs_of(workload_arg: str):  # noqa: ANN202
    """The RunConfigs whose shapes are tuned: the user's, or the baseline portfolio's."""
    from autotune.portfolio import baseline_configs

    wl, user = load_workload(workload_arg)
    return [user] if user is not None else baseline_configs(wl)


def tune(args: argparse.Namespace) -> int:
    from autotune import __version__
    from autotune.kernel_tune import tune_kernels
    from kernels.cache import CacheMismatch, TuningCache
    from kernels.registry import KERNELS
    from kernels.tuned import default_cache_path
    from profilers.fingerprint import current_fingerprint

    wanted = args.kernel or list(KERNELS)
    unknown = [k for k in wanted if k not in KERNELS]
    if unknown:
        raise UserError(f"--kernel {unknown[0]}: no such kernel (choose from {', '.join(KERNELS)})")
    rcs = _configs_of(args.workload)
    device = rcs[0].workload.hardware.device
    if device != "cpu":
        raise UserError("kernels tune times the CPU implementations here; Triton kernels are "
                        "tuned on a GPU machine (device cuda) by the same command there")
    fp = current_fingerprint(device, __version__)
    path = Path(args.cache) if args.cache else default_cache_path(device)
    try:
        cache = TuningCache.load(path, fp.key(), json.loads(fp.model_dump_json())
                                 if hasattr(fp, "model_dump_json") else {})
    except CacheMismatch as exc:
        raise UserError(str(exc)) from None
    summary = tune_kernels(rcs, wanted, cache, dtype_name=args.dtype or rcs[0].precision.dtype,
                           budget=args.budget, min_memory_cut=args.min_memory_cut)
    if args.json:
        print(json.dumps({"cache": str(path), "kernels": summary}, indent=2))
        return 0
    for name, r in summary.items():
        print(f"{name}: {r['shapes']} shapes x {r['configs']} configs, {r['measured_pairs']} "
              f"measured ({r['measured_pairs'] / (r['shapes'] * r['configs']):.0%})", file=sys.stdout)
        for t in r["tuned"]:
            print(f"  {t['shape']}: {t['config']} {t['seconds'] * 1e3:.2f} ms")
        for f in r["failed"]:
            print(f"  failed, not picked: {f['shape']}: {f['config']}: {f['error']}")
    print(f"cache: {path}")
    return 0
