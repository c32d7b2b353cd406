"""``autotune train RUNCONFIG``: train with the reference trainer and log loss and throughput."""

from __future__ import annotations

import argparse
import logging
import time

from tqdm import tqdm

from autotune.cli._common import load_runconfig, positive_int, print_json, require_single_rank

log = logging.getLogger("autotune.train")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a RunConfig with the reference trainer")
    p.add_argument("runconfig", help="RunConfig YAML")
    p.add_argument("--steps", type=positive_int, default=20, help="optimizer steps (default 20)")
    p.add_argument("--log-every", type=positive_int, default=10,
                   help="log a line every K steps when no progress bar is shown")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autotune.train.trainer import Trainer

    rc, dataset = load_runconfig(args.runconfig)
    require_single_rank(rc, args.runconfig)
    trainer = Trainer(rc, dataset=dataset)
    history = []
    bar = tqdm(total=args.steps, unit="step", desc=rc.label(), disable=None, leave=False)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        r = trainer.step()
        dt = time.perf_counter() - t0
        history.append((r, dt))
        bar.update(1)
        bar.set_postfix(loss=f"{r.loss:.4f}", tok_s=f"{r.tokens / dt:,.0f}")
        if bar.disable and (r.step % args.log_every == 0 or r.step == args.steps):
            log.info("step %d loss %.4f tokens %d tok/s %.0f", r.step, r.loss, r.tokens,
                     r.tokens / dt)
    bar.close()
    tokens = sum(r.tokens for r, _ in history)
    seconds = sum(dt for _, dt in history)
    summary = {"config": rc.label(), "steps": len(history), "final_loss": history[-1][0].loss,
               "losses": [r.loss for r, _ in history], "tokens": tokens,
               "tokens_per_s": tokens / seconds, "wall_s": seconds}
    if args.json:
        print_json(summary)
    else:
        print(f"{rc.label()}: {len(history)} steps, final loss {summary['final_loss']:.4f}, "
              f"{summary['tokens_per_s']:,.0f} tokens/s")
    return 0
