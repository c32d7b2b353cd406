"""One benchmark run, as every rank runs it: train a RunConfig until its held-out evaluation
loss reaches the suite's quality target or its time limit passes, logging MLPerf-style.

    python -m suites.target_run CONFIG --target LOSS --time-limit S --benchmark NAME
        --out DIR [--eval-every STEPS] [--eval-sequences N] [--max-steps N]

Under torchrun for several ranks (``autotune bench`` starts it). Rank 0 writes
``DIR/mlperf.log`` (through ``suites.mlperf.BenchLog``) and ``DIR/result.json``. The clock of
the score runs from ``run_start`` to ``run_stop`` as MLPerf's does: evaluation is inside it,
start-up (model build, data load, process launch) before it. Whether to stop is rank 0's
decision, broadcast, so that ranks whose clocks disagree never part ways mid-collective.
The limit is checked between optimizer steps (a step is never cut short), so a run with
slow steps stops up to one step past it, then is evaluated once more.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from autotune import __version__
from autotune.config import RunConfig, load_yaml
from autotune.data import load_eval_dataset
from autotune.train.distributed import (
    ParallelContext,
    init_parallel,
    results_written,
    shutdown_parallel,
)
from autotune.train.trainer import Trainer
from profilers.ceilings import matmul_ceiling
from profilers.store import atomic_write_text
from suites.mlperf import BenchLog

__all__ = ["main"]

log = logging.getLogger("suites.target_run")

SUCCESS, ABORTED = "success", "aborted"


def _agree(ctx: ParallelContext, stop: int) -> int:
    """Rank 0's verdict (0 go on, 1 target reached, 2 time up) on every rank."""
    if not ctx.distributed:
        return stop
    t = torch.tensor([stop], dtype=torch.int64)
    torch.distributed.broadcast(t, src=0)
    return int(t.item())


def train_to_target(rc: RunConfig, ctx: ParallelContext, *, target: float, time_limit_s: float,
                    benchmark: str, out: Path, eval_every: int, eval_sequences: int,
                    max_steps: int | None) -> dict | None:
    rank0 = ctx.rank == 0
    mll = BenchLog(out / "mlperf.log", benchmark=benchmark, rank0=rank0)
    mll.submission(platform=f"{rc.workload.hardware.device} x {ctx.world} ranks "
                            f"(autotune {__version__})")
    mll.init_start()
    trainer = Trainer(rc, ctx=ctx)
    held_out = load_eval_dataset(rc.workload.data, trainer.dims, eval_sequences)
    batch_size, accumulation = _batch_shape(trainer)
    mll.hyperparameters(
        global_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        seed=rc.seed, learning_rate=rc.optimizer.lr, tensor_parallelism=rc.parallel.tp,
        pipeline_parallelism=rc.parallel.pp, context_parallelism=rc.parallel.cp,
        max_sequence_length=int(trainer.dataset.max_len),
        extra={"global_batch_tokens": rc.workload.budget.global_batch_tokens,
               "data_parallelism": rc.parallel.dp, "zero_stage": rc.parallel.zero_stage,
               "scheduling_policy": rc.schedule.policy, "config": rc.label()})
    mll.train_samples(len(trainer.dataset.lengths))
    mll.eval_samples(len(held_out.lengths))
    mll.init_stop()
    if ctx.world > 1:
        torch.distributed.barrier()
    mll.run_start()
    start = time.perf_counter()
    samples = steps = tokens = 0
    flops = train_s = 0.0
    evals: list[dict] = []
    train: list[dict] = []
    status, micro = ABORTED, []
    mll.block_start(samples_count=0)
    while True:
        t0 = time.perf_counter()
        r = trainer.step()
        train_s += time.perf_counter() - t0
        steps += 1
        samples += len(r.batch_ids)
        tokens += r.tokens
        flops += r.model_flops
        micro.append(r.micro_batches)
        train.append({"wall_s": time.perf_counter() - start, "step": steps, "loss": r.loss})
        verdict = 0
        out_of_time = (time.perf_counter() - start >= time_limit_s
                       or (max_steps is not None and steps >= max_steps))
        # A run stopped by its limit is evaluated once more, so its log and result say what
        # quality it reached, not the quality of its last scheduled evaluation.
        if steps % eval_every == 0 or _agree(ctx, int(out_of_time)):
            mll.block_stop(samples_count=samples)
            mll.eval_start(samples_count=samples)
            loss = trainer.evaluate(held_out.sequences)
            mll.eval_stop(samples_count=samples)
            mll.eval_accuracy(loss, samples_count=samples)
            evals.append({"wall_s": time.perf_counter() - start, "step": steps,
                          "samples": samples, "eval_loss": loss})
            log.info("step %d samples %d eval loss %.4f (target %.4f)", steps, samples, loss, target)
            verdict = 1 if loss <= target else 0
        if not verdict and out_of_time:
            verdict = 2
        verdict = _agree(ctx, verdict)
        if verdict:
            status = SUCCESS if verdict == 1 else ABORTED
            break
        if evals and evals[-1]["step"] == steps:
            mll.block_start(samples_count=samples)
    if evals and evals[-1]["step"] != steps:
        mll.block_stop(samples_count=samples)
    mll.run_stop(status=status, samples_count=samples)
    time_to_train = time.perf_counter() - start
    if not rank0:
        return None
    ceiling = matmul_ceiling(rc.precision.dtype, rc.workload.hardware.device)
    mfu = flops / train_s / (ceiling.flops_per_s * ctx.world) if train_s else None
    return {"status": status, "reason": None if status == SUCCESS else
            f"eval loss {evals[-1]['eval_loss']:.4f} after {steps} steps, above the target "
            f"{target}, when the time limit of {time_limit_s:g} s passed",
            "time_to_train_s": time_to_train, "wall_s": time_to_train, "train_samples": samples,
            "tokens": tokens, "tokens_per_s": tokens / train_s if train_s else None,
            "mfu": mfu, "mfu_source": f"model FLOPs over the measured {ceiling.dtype} matmul "
            f"ceiling x {ctx.world} ranks ({ceiling.method})",
            "energy_j": None, "steps": steps, "micro_batches_per_step_rank0": micro,
            "eval": evals, "train": train, "config": rc.label(), "seed": rc.seed,
            "eval_sequences": eval_sequences, "entropy_floor": held_out.entropy_floor}


def _batch_shape(trainer: Trainer, batches: int = 16) -> tuple[int, int]:
    """Sequences per global batch and micro-batches per rank per step: both vary with the
    token-budgeted batches, so MLPerf's single figures are the medians over the stream's
    first ``batches``, planned from a copy of the stream so training is untouched."""
    from itertools import islice

    import numpy as np

    from autotune.data import step_plans

    sizes, micro = [], []
    for b in islice(step_plans(trainer.rc, trainer.dataset.lengths, trainer.dims), batches):
        sizes.append(len(b.ids))
        micro.append(b.ranks[0].n_micro)
    return max(1, int(np.median(sizes))), max(1, int(np.median(micro)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.target_run")
    p.add_argument("config")
    p.add_argument("--target", type=float, required=True, help="held-out eval loss to reach")
    p.add_argument("--time-limit", type=float, required=True, help="seconds from run_start")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--eval-every", type=int, default=5, help="optimizer steps between evaluations")
    p.add_argument("--eval-sequences", type=int, default=64)
    p.add_argument("--max-steps", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rc = load_yaml(RunConfig, args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = init_parallel(rc)
    try:
        result = train_to_target(rc, ctx, target=args.target, time_limit_s=args.time_limit,
                                 benchmark=args.benchmark, out=out, eval_every=args.eval_every,
                                 eval_sequences=args.eval_sequences, max_steps=args.max_steps)
        if result is not None:
            atomic_write_text(out / "result.json", json.dumps(result, indent=1))
        results_written(ctx)
    finally:
        shutdown_parallel(ctx)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
