"""``autotune memory RUNCONFIG``: peak memory per rank at real scale, traced under fake tensors."""

from __future__ import annotations

import argparse
import sys

from autotune.cli._common import load_runconfig, non_negative_int, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="trace a RunConfig's peak memory per rank at real "
                                      "scale, without its devices (fake tensors)")
    p.add_argument("runconfig", help="RunConfig YAML")
    p.add_argument("--rank", type=non_negative_int, default=None,
                   help="the rank to trace (default: the first rank of the data-parallel "
                        "replica with the heaviest work); with pp > 1 its replica's first rank "
                        "of every stage is traced too")
    p.add_argument("--json", action="store_true", help="print the trace as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autotune.memtrace import TraceFailed, trace_memory
    from autotune.memtrace import size as _size

    rc, _ = load_runconfig(args.runconfig)
    try:
        trace = trace_memory(rc, rank=args.rank)
    except TraceFailed as exc:
        print(f"autotune: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(trace.to_json_dict())
        return 0
    r = trace.rank
    print(f"{trace.config}: peak {_size(r.peak_bytes)} on rank {r.rank} of "
          f"{trace.world} (pipeline stage {r.stage}), traced in {trace.seconds:.0f} s")
    print(f"  traced: {r.traced} ({r.tracker})")
    _print_breakdown(r.breakdown, r.peak_bytes)
    if trace.stages:
        print("  per pipeline stage (the first rank of this replica's share of each):")
        for s in trace.stages:
            top = max(s.breakdown, key=lambda k: s.breakdown[k])
            print(f"    stage {s.stage} (rank {s.rank}): {_size(s.peak_bytes)}, "
                  f"most in {top} ({_size(s.breakdown[top])})")
    return 0


def _print_breakdown(breakdown: dict[str, int], peak: int) -> None:
    from autotune.memtrace import size as _size

    for part, size in breakdown.items():
        if size:
            print(f"  {part:<24} {_size(size):>14}  {size / peak:6.1%}")
