"""``autotune import --from deepspeed|accelerate FILE [--workload FILE] [--out RUNCONFIG]``:
a user's existing config as a RunConfig, to measure it and use it as a baseline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autotune.cli._common import WORKLOAD_PRESETS
from autotune.export.importers import IMPORTERS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="read a DeepSpeed or Accelerate config into a RunConfig")
    p.add_argument("file", help="the config to read (DeepSpeed JSON, Accelerate YAML)")
    p.add_argument("--from", required=True, choices=sorted(IMPORTERS), dest="fmt",
                   help="what FILE is")
    p.add_argument("--workload", default="tiny",
                   help=f"model, data, hardware and budget the config runs on: a workload "
                        f"YAML or a preset ({', '.join(WORKLOAD_PRESETS)}; default tiny). "
                        f"An Accelerate config's processes and machines replace its hardware")
    p.add_argument("--out", help="RunConfig YAML to write (default: print to stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autotune.cli._common import load_workload
    from autotune.config import dump_yaml, save_yaml

    imported = IMPORTERS[args.fmt](Path(args.file), load_workload(args.workload)[0])
    notes = "".join(f"{args.file}: {n}\n" for n in imported.notes)
    if args.out is None:
        sys.stdout.write(dump_yaml(imported.runconfig))
        sys.stderr.write(notes)
        return 0
    save_yaml(imported.runconfig, args.out)
    print(notes, end="")
    print(f"wrote {args.out}")
    return 0
