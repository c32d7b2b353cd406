"""``autotune profile``: measure op families on the devices present into a profile store."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from autotune.cli._common import (
    WORKLOAD_PRESETS,
    add_launch_args,
    load_workload,
    positive_float,
    positive_int,
)
from autotune.errors import UserError
from profilers.families import FAMILIES, OP_FAMILIES
from profilers.isolation import guarded


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
    p.add_argument("--families", default=",".join(OP_FAMILIES),
                   help=f"comma-separated families ({', '.join(FAMILIES)}); default the op "
                        f"families, collective only when named")
    p.add_argument("--workload", default="tiny",
                   help=f"workload whose shapes are swept: a Workload YAML, a RunConfig YAML (its "
                        f"workload) or a preset ({', '.join(WORKLOAD_PRESETS)}); default tiny")
    p.add_argument("--space", help="search-space YAML whose candidates set the shapes "
                                   "(default: the built-in search space)")
    p.add_argument("--budget-s", type=float, help="stop after this many seconds; re-running "
                                                  "resumes where it stopped")
    p.add_argument("--out", default="profiles", help="profile store folder (default profiles/)")
    p.add_argument("--min-time-s", type=positive_float,
                   help="timed time per window after warm-up (default 0.05; 0.2 per message "
                        "size for collectives)")
    p.add_argument("--windows", type=positive_int,
                   help="timed windows per case, a round of all cases apart (default 8 on a "
                        "CPU, whose speed drifts with its neighbours; 3 on a GPU)")
    p.add_argument("--case-timeout-s", type=positive_float, default=300.0,
                   help="a case running longer is recorded as TIMEOUT (default 300)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    g = p.add_argument_group("collective family")
    g.add_argument("--min-bytes", type=_bytes, default=4096,
                   help="smallest collective message (default 4KiB)")
    g.add_argument("--max-bytes", type=_bytes, default=256 * 2**20,
                   help="largest collective message (default 256MiB)")
    add_launch_args(p)
    p.set_defaults(func=run)


def _families(text: str) -> list[str]:
    families = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise UserError(f"--families: unknown family {unknown[0] if unknown else '(none)'!r}; "
                        f"choose from {', '.join(FAMILIES)}")
    return families


def _open_store(out: Path, device_kind: str):  # noqa: ANN202
    from autotune import __version__
    from profilers.fingerprint import current_fingerprint
    from profilers.store import ProfileStore, StoreError

    fp = current_fingerprint(device_kind, __version__)
    try:
        return ProfileStore.open(out, fp.key(), fp.model_dump(mode="json"))
    except StoreError as exc:
        raise UserError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    families = _families(args.families)
    if args.budget_s is not None and not args.budget_s > 0:
        raise UserError(f"--budget-s must be positive, got {args.budget_s:g}")
    if args.min_bytes > args.max_bytes:
        raise UserError(f"--min-bytes {args.min_bytes} is above --max-bytes {args.max_bytes}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    launch = None
    if "collective" in families:
        from autotune.launch import Launch

        launch = Launch(args.nproc or 2, args.nnodes or 1, args.node_rank, args.rdzv_endpoint)
        if launch.world < 2:
            raise UserError("--nproc: collectives need at least 2 ranks")
    op_families = tuple(f for f in families if f != "collective")
    cases, dtypes = [], []
    if op_families:
        from autotune.config import SearchSpace, load_yaml
        from autotune.profile_grid import op_cases

        workload = load_workload(args.workload)[0]
        space = load_yaml(SearchSpace, args.space) if args.space else SearchSpace()
        cases = op_cases(workload, space, op_families)
        dtypes = list(space.dtype)
    import torch

    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    store = _open_store(out, device_kind)
    from profilers.store import StoreError

    try:
        summary = _profile(args, store, cases, dtypes, launch, device_kind)
    except StoreError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 1 if summary.get("collective_failed") else 0


def _profile(args: argparse.Namespace, store, cases: list[dict], dtypes: list[str],  # noqa: ANN001
             launch, device_kind: str) -> dict:  # noqa: ANN001
    import time

    from profilers.sweep import sweep

    start = time.monotonic()
    summary: dict = {"store": str(store.root), "fingerprint": store.fingerprint_key}
    if cases:
        report = sweep(cases, store, device_kind=device_kind, budget_s=args.budget_s,
                       case_timeout_s=args.case_timeout_s, min_time_s=args.min_time_s or 0.05,
                       windows=args.windows or (3 if device_kind == "cuda" else 8),
                       progress=not args.json)
        summary |= {"cases": len(cases), "measured": report.measured, "skipped": report.skipped,
                    "failed": report.failed, "remaining": report.remaining}
        if not report.remaining:
            from autotune import __version__

            store.record_ceilings(dtypes, device_kind, package_version=__version__)
    if launch is not None:
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - start)
        if left is not None and left <= 0:
            summary["collective"] = "not started: budget spent"
        else:
            code = _collectives(args, store, launch)
            summary["collective"] = "done" if code == 0 else f"failed (launcher exit code {code})"
            summary["collective_failed"] = code != 0
    summary["rows"] = {fam: store.rows(fam) for fam in store.families()}
    summary["wall_s"] = round(time.monotonic() - start, 1)
    return summary


def _collectives(args: argparse.Namespace, store, launch) -> int:  # noqa: ANN001
    from autotune.launch import check_host_capacity
    from profilers.collectives import COLLECTIVES, collective_key, message_bytes, message_sizes

    backend = "nccl" if store.fingerprint.get("device_kind") == "cuda" else "gloo"
    wanted = {collective_key(c, message_bytes(n, launch.world), launch.world, backend)
              for c in COLLECTIVES for n in message_sizes(args.min_bytes, args.max_bytes)}
    if wanted <= store.keys("collective"):
        print("collectives: every size is already in the store", file=sys.stderr)
        return 0
    check_host_capacity(launch.nproc, "cuda" if store.fingerprint.get("device_kind") == "cuda"
                        else "cpu")
    argv = launch.argv("profilers.collectives", [
        "--out", str(store.root), "--min-bytes", str(args.min_bytes),
        "--max-bytes", str(args.max_bytes), "--min-time-s", str(args.min_time_s or 0.2)])
    return subprocess.run(guarded(argv), check=False).returncode


def _print_summary(summary: dict) -> None:
    if "cases" in summary:
        failed = ", ".join(f"{n} {s}" for s, n in summary["failed"].items()) or "none"
        print(f"{summary['cases']} cases: {summary['measured']} windows measured, "
              f"{summary['skipped']} already in the store, failed: {failed}; "
              f"{summary['remaining']} left", file=sys.stderr)
        if summary["remaining"]:
            print("budget spent: run the same command again to resume", file=sys.stderr)
    if "collective" in summary:
        print(f"collectives: {summary['collective']}", file=sys.stderr)
    rows = ", ".join(f"{fam} {n}" for fam, n in summary["rows"].items())
    print(f"store {summary['store']} (fingerprint {summary['fingerprint']}): {rows}")
