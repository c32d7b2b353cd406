"""``autotune trace RUNCONFIG``: profile a few training steps with torch.profiler and split
the step time into cost families (see ``profilers/trace.py``)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.cli._common import (
    load_runconfig,
    non_negative_int,
    positive_float,
    positive_int,
    print_json,
)
from autotune.errors import UserError

if TYPE_CHECKING:
    from profilers.trace import StepTarget

BUILDER = "autotune.cli.trace_cmd:trainer_target"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="profile training steps and split their time by op family")
    p.add_argument("runconfig", help="RunConfig YAML (one process)")
    p.add_argument("--wait", type=non_negative_int, default=1,
                   help="steps run before the profiler starts (default 1)")
    p.add_argument("--warmup", type=non_negative_int, default=1,
                   help="steps profiled and discarded (default 1)")
    p.add_argument("--active", type=positive_int, default=3,
                   help="steps profiled and kept (default 3)")
    p.add_argument("--out", help="trace folder (default traces/<config label>); view with "
                                 "tensorboard --logdir on its parent (torch-tb-profiler)")
    p.add_argument("--timeout", type=positive_float, default=900.0,
                   help="seconds before the run counts as hung (default 900)")
    p.add_argument("--json", action="store_true", help="print the family table as JSON")
    p.set_defaults(func=run)


def trainer_target(config: str) -> StepTarget:
    """The child's step: the reference trainer built from a RunConfig file."""
    from autotune.config import RunConfig, load_yaml
    from autotune.train.distributed import init_parallel
    from autotune.train.trainer import Trainer
    from profilers.trace import StepTarget

    rc = load_yaml(RunConfig, config)
    trainer = Trainer(rc, ctx=init_parallel(rc))
    return StepTarget(step=trainer.step, device=rc.workload.hardware.device, label=rc.label())


def run(args: argparse.Namespace) -> int:
    from autotune.config import save_yaml
    from profilers.trace import run_trace

    rc, _ = load_runconfig(args.runconfig)
    if rc.parallel.world_size > 1:
        raise UserError(f"{args.runconfig}: trace profiles one process, but dp*tp*pp*cp = "
                        f"{rc.parallel.world_size}; trace a single-device config")
    out = Path(args.out) if args.out else Path("traces") / rc.label()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    kind = rc.workload.hardware.device
    cap = int(rc.workload.budget.memory_cap_gb * 2**30) if kind == "cpu" else None
    print(f"tracing {rc.label()}: {args.wait} + {args.warmup} + {args.active} steps (wait, "
          f"warm-up, profiled) in a separate process ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="autotune-trace-") as tmp:
        cfg = Path(tmp) / "config.yaml"
        save_yaml(rc, cfg)
        outcome = run_trace(BUILDER, cfg, out, wait=args.wait, warmup=args.warmup,
                            active=args.active, timeout_s=args.timeout, mem_cap_bytes=cap)
    if outcome.summary is None:
        if args.json:
            print_json({"status": outcome.status.value, "reason": outcome.reason,
                        "log_tail": outcome.log_tail})
        else:
            print(f"{rc.label()}: {outcome.status.value}: {outcome.reason}")
        return 1
    summary = {"status": outcome.status.value, "out": str(out), **outcome.summary}
    if args.json:
        print_json(summary)
    else:
        _print_table(summary)
    return 0


def _print_table(s: dict) -> None:
    time_kind = "device" if s["basis"] == "device" else "CPU"
    print(f"{s['label']}: {s['steps']} profiled steps, {s['step_time_s']:.3f} s per step "
          f"(self {time_kind} time by family)")
    print(f"  {'family':<13}{'self s':>10}{'share':>9}")
    for row in s["families"]:
        print(f"  {row['family']:<13}{row['self_s']:>10.3f}{row['fraction']:>9.1%}")
    print(f"coverage {s['coverage']:.1%} of the measured step time; trace, ops.parquet and "
          f"families.md in {s['out']}")
