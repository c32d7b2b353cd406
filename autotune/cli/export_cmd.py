"""``autotune export RUNCONFIG --format FORMAT [--out FILE]``: the run as another trainer's
configuration. The knobs the target has no setting for, with the substitute chosen for each,
are printed and written beside the output as ``FILE.unmapped.txt``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autotune.errors import UserError
from autotune.export import EXPORTERS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a RunConfig to DeepSpeed, Megatron-LM, "
                                      "torchtitan, Accelerate, TRL or a Slurm script")
    p.add_argument("runconfig", help="RunConfig YAML")
    p.add_argument("--format", required=True, choices=sorted(EXPORTERS), dest="fmt",
                   help="target trainer")
    p.add_argument("--out", help="output file (default: print to stdout); the unmapped "
                                 "knobs go to FILE.unmapped.txt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autotune.cli._common import load_runconfig
    from autotune.export import Facts, export_runconfig, unmapped_report
    from profilers.store import atomic_write_text

    rc, dataset = load_runconfig(args.runconfig)
    source = Path(args.runconfig).resolve()
    result = export_runconfig(rc, args.fmt, Facts.of(rc, dataset, runconfig_path=source))
    if result.text is None:
        raise UserError(f"{args.runconfig}: {args.fmt} cannot express this run: "
                        f"{'; '.join(result.refused)}")
    report = unmapped_report(result, source=args.runconfig)
    if args.out is None:
        sys.stdout.write(result.text)
        sys.stderr.write(report)
        return 0
    out = Path(args.out)
    sidecar = out.with_name(out.name + ".unmapped.txt")
    atomic_write_text(out, result.text)
    atomic_write_text(sidecar, report)
    print(report, end="")
    print(f"wrote {out} and {sidecar}")
    return 0
