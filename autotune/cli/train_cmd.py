"""``autotune train RUNCONFIG``: train with the reference trainer, with checkpoints, resume
(on another layout too), evaluation, metrics and a Hugging Face export."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from autotune.cli._common import (
    add_launch_args,
    launch_from_args,
    load_runconfig,
    non_negative_int,
    positive_int,
    print_json,
)
from autotune.errors import UserError
from profilers.isolation import guarded


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a RunConfig with the reference trainer")
    p.add_argument("runconfig", help="RunConfig YAML")
    p.add_argument("--steps", type=positive_int, default=20,
                   help="the run's optimizer steps, counted from its start: with --resume, "
                        "the same command finishes the same run (default 20)")
    p.add_argument("--log-every", type=positive_int, default=10,
                   help="log a line every K steps when no progress bar is shown")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", type=Path, metavar="DIR",
                   help="write sharded checkpoints (torch.distributed.checkpoint) under DIR, "
                        "and the metrics beside them")
    g.add_argument("--save-every", type=positive_int, metavar="N",
                   help="a checkpoint every N steps (default 500), and one at the end")
    g.add_argument("--keep", type=positive_int, metavar="K", help="keep the K latest checkpoints")
    g.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue from the latest checkpoint under DIR (or a step-N folder), "
                        "under this RunConfig's layout; a DIR with none yet starts at step 0")
    g.add_argument("--force", action="store_true",
                   help="resume although the RunConfig changes what the steps train on "
                        "(global batch, data, optimizer, seed, precision)")
    g = p.add_argument_group("evaluation and logs")
    g.add_argument("--eval-every", type=non_negative_int, metavar="K",
                   help="held-out loss every K steps (default: once, at the end; 0: never)")
    g.add_argument("--eval-sequences", type=positive_int, default=64,
                   help="held-out sequences (default 64)")
    g.add_argument("--log-dir", type=Path, metavar="DIR",
                   help="metrics.jsonl and TensorBoard events (default: the --save folder)")
    g.add_argument("--export-hf", type=Path, metavar="DIR",
                   help="write the final weights as Hugging Face safetensors + config.json")
    add_launch_args(p)
    p.set_defaults(func=run)


def _options(args: argparse.Namespace):
    from autotune.train.session import TrainOptions

    return TrainOptions(steps=args.steps, log_every=args.log_every, save=args.save,
                        save_every=args.save_every, keep=args.keep, resume=args.resume,
                        force=args.force, eval_every=args.eval_every,
                        eval_sequences=args.eval_sequences, log_dir=args.log_dir,
                        export_hf=args.export_hf)


def _launch(args: argparse.Namespace, launch, opts) -> dict | None:
    with tempfile.TemporaryDirectory(prefix="autotune-train-") as tmp:
        out, err = Path(tmp) / "summary.json", Path(tmp) / "error.txt"
        argv = launch.argv("autotune.train.worker", [
            args.runconfig, "--mode", "train", "--steps", str(args.steps),
            "--log-every", str(args.log_every), "--out", str(out), "--error-out", str(err),
            "--train-options", opts.to_json()])
        code = _run_passing_stops(guarded(argv))
        if err.is_file():
            raise UserError(err.read_text().strip())
        summary = json.loads(out.read_text()) if out.is_file() else None
        # A stopped run's launcher, signalled too, exits non-zero after the ranks saved.
        if summary is not None and (code == 0 or summary.get("stopped_by")):
            return summary
        if launch.node_rank != 0 and code == 0:
            return None
        print(f"autotune: training failed (launcher exit code {code})", file=sys.stderr)
        raise SystemExit(1)


def _run_passing_stops(argv: list[str]) -> int:
    """Run the launcher; SIGTERM or SIGINT here goes on to the ranks themselves, which save
    and stop after their step (torchrun would tear them down within 30 s); a second SIGINT
    kills them."""
    import contextlib

    import psutil

    proc = subprocess.Popen(argv)
    seen: list[int] = []

    def ranks() -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "autotune.train.worker" in " ".join(p.cmdline())]
        return []

    def on_signal(signum: int, frame: object) -> None:
        again = signum == signal.SIGINT and signal.SIGINT in seen
        seen.append(signum)
        for p in ranks():
            with contextlib.suppress(psutil.Error):
                p.kill() if again else p.send_signal(signum)
        if not again:
            print(f"autotune: {signal.Signals(signum).name}: the ranks stop after this step "
                  "and a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run(args: argparse.Namespace) -> int:
    from autotune.train.session import resolve

    rc, dataset = load_runconfig(args.runconfig)
    launch = launch_from_args(rc, args)
    opts = _options(args)
    start = resolve(rc, opts)  # a checkpoint that does not fit is refused before any rank starts
    for note in start.notes:
        print(f"resume: {note}", file=sys.stderr)
    if launch.world == 1:
        from autotune.train.distributed import init_parallel
        from autotune.train.faults import Fault
        from autotune.train.session import train

        summary, _ = train(rc, init_parallel(rc), opts, fault=Fault.from_env(), start=start)
    else:
        summary = _launch(args, launch, opts)
    if summary is None:  # not the node holding rank 0 of a multi-node run
        return 0
    stopped = summary.get("stopped_by")
    if stopped:
        print(f"autotune: stopped by {stopped} after step {summary['final_step']} of "
              f"{args.steps}, checkpoint {summary['checkpoints'][-1]}: the same command with "
              f"--resume {args.save} continues the run", file=sys.stderr)
    if args.json:
        print_json(summary)
    if stopped:
        return 128 + signal.Signals[stopped].value
    if args.json:
        return 0
    loss = summary["final_loss"]
    print(f"{summary['config']}: steps {summary['start_step']}-{summary['final_step']} on "
          f"{summary['ranks']} rank(s), final loss "
          f"{'-' if loss is None else f'{loss:.4f}'}, "
          f"{summary['tokens_per_s'] or 0:,.0f} tokens/s"
          + (f", eval loss {summary['eval'][-1]['eval_loss']:.4f}" if summary["eval"] else ""))
    for path in summary["checkpoints"][-1:]:
        print(f"checkpoint: {path}")
    for path in summary["exported"][:1]:
        print(f"exported: {Path(path).parent}")
    return 0
