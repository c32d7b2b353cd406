"""``autotune profile``: measure op families on the devices present and store the tables."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from autotune.cli._common import add_launch_args
from autotune.errors import UserError

FAMILIES = ("collective",)


def _bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if t[-1:] in units else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 4096, 64KiB or 256MiB, "
                                         f"got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure op families on the devices present")
    p.add_argument("--families", default="collective",
                   help=f"comma-separated families to profile ({', '.join(FAMILIES)})")
    add_launch_args(p)
    p.add_argument("--min-bytes", type=_bytes, default=4096,
                   help="smallest collective message (default 4KiB)")
    p.add_argument("--max-bytes", type=_bytes, default=256 * 2**20,
                   help="largest collective message (default 256MiB)")
    p.add_argument("--min-time-s", type=float, default=0.2,
                   help="timed window per message size, after warm-up (default 0.2)")
    p.add_argument("--out", default="profiles", help="profile store folder (default profiles/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autotune.launch import Launch, check_host_capacity

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise UserError(f"--families: unknown family {unknown[0] if unknown else '(none)'!r}; "
                        f"choose from {', '.join(FAMILIES)}")
    if args.min_bytes > args.max_bytes:
        raise UserError(f"--min-bytes {args.min_bytes} is above --max-bytes {args.max_bytes}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if not args.min_time_s > 0:
        raise UserError(f"--min-time-s must be positive, got {args.min_time_s}")
    launch = Launch(args.nproc or 2, args.nnodes or 1, args.node_rank, args.rdzv_endpoint)
    if launch.world < 2:
        raise UserError("--nproc: collectives need at least 2 ranks")
    import torch

    check_host_capacity(launch.nproc, "cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    argv = launch.argv("profilers.collectives", [
        "--out", str(out), "--min-bytes", str(args.min_bytes), "--max-bytes", str(args.max_bytes),
        "--min-time-s", str(args.min_time_s)])
    code = subprocess.run(argv, check=False).returncode
    if code != 0:
        print(f"autotune: collective profiling failed (launcher exit code {code})", file=sys.stderr)
        return 1
    print(f"wrote {out / 'collective.parquet'} and {out / 'collective_fit.parquet'}")
    return 0
