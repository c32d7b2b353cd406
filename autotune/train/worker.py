"""What every rank runs: ``python -m autotune.train.worker`` (under torchrun for many ranks).

``--mode measure`` discards warm-up steps, times the rest, replays the heaviest timed step
under a tensor-memory tracker (CPU) and writes one Measurement from rank 0; ``--mode train``
trains with a progress bar on rank 0 and writes a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
from pathlib import Path

import numpy as np
import torch

from autotune import __version__
from autotune.config import RunConfig, load_yaml
from autotune.errors import UserError
from autotune.train.distributed import (
    ParallelContext,
    init_parallel,
    results_written,
    shutdown_parallel,
)
from autotune.train.faults import Fault
from autotune.train.session import TrainOptions, train
from autotune.train.trainer import StepResult, Trainer
from profilers.ceilings import Ceiling, datasheet_peak, matmul_ceiling, remeasure_if_outrun
from profilers.fingerprint import current_fingerprint
from profilers.memory import TensorMemoryTracker
from profilers.ops import canary_reference, canary_time
from profilers.records import Measurement, Status
from profilers.store import atomic_write_bytes, atomic_write_text
from profilers.telemetry import Telemetry, energy_per_token
from profilers.timer import StepTimer, summarize

__all__ = ["main"]

log = logging.getLogger("autotune.worker")
_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")


def _gather(ctx: ParallelContext, obj: object) -> list[object]:
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[object] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def _peak_tensor_memory(trainer: Trainer, batch_ids: np.ndarray) -> tuple[int, dict[str, int]]:
    """Replay one step under the tensor tracker: peak bytes of live tensors, and how much of
    that was there before the step (parameters, gradients, optimizer state)."""
    state = [t for s in trainer.optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor)]
    grads = [p.grad for p in trainer.params if p.grad is not None]
    with TensorMemoryTracker(existing=list(trainer.params) + grads + state) as tracker:
        trainer.step(batch_ids)
    return tracker.peak_bytes, {"mem_state_bytes": tracker.baseline_bytes,
                                "mem_step_peak_bytes": tracker.peak_bytes - tracker.baseline_bytes}


def _canary(ctx: ParallelContext, kind: str) -> float | None:
    """The profiler's canary matmul on rank 0 while the others wait: the same yardstick the
    op profiles are scaled by. None on a GPU, which has no canary (there it would time launch
    latency, not what steps depend on)."""
    if kind != "cpu":
        return None
    t = canary_time(kind) if ctx.rank == 0 else 0.0
    if ctx.world > 1:
        torch.distributed.barrier()
    return t


def _mfu(flops_per_s: float, ceiling: Ceiling, rc: RunConfig, world: int
         ) -> tuple[float | None, str, dict]:
    source = (f"measured {ceiling.dtype} matmul ceiling {ceiling.flops_per_s / 1e9:.1f} GFLOP/s "
              f"per rank x {world} ranks ({ceiling.method}; fingerprint "
              f"{ceiling.fingerprint_key})")
    extra: dict[str, float] = {}
    if rc.workload.hardware.device == "cuda":
        name = rc.workload.hardware.device_name or torch.cuda.get_device_name(0)
        peak = datasheet_peak(name, rc.precision.dtype)
        if peak:
            extra["mfu_datasheet"] = flops_per_s / (peak * world)
            extra["datasheet_peak_flops"] = peak
    mfu = flops_per_s / (ceiling.flops_per_s * world)
    if mfu > 1.0:  # still above it when measured again: no ceiling worth dividing by
        extra["mfu_withheld"] = mfu
        return None, source + "; MFU withheld: the steps ran faster than the ceiling measured " \
            "again", extra
    return mfu, source, extra


def _imbalance(ctx: ParallelContext, per_rank: list[list[float]], rc: RunConfig
               ) -> tuple[float, list[float]]:
    """Median over steps of max/mean compute time across data-parallel replicas (a replica
    is as slow as its slowest rank)."""
    p = rc.parallel
    steps = len(per_rank[0])
    ratios, replica_means = [], np.zeros(p.dp)
    for s in range(steps):
        replica = np.zeros(p.dp)
        for rank, times in enumerate(per_rank):
            dp_rank = (rank // (p.tp * p.cp)) % p.dp  # mesh order (pp, dp, cp, tp)
            replica[dp_rank] = max(replica[dp_rank], times[s])
        ratios.append(replica.max() / replica.mean())
        replica_means += replica / steps
    return float(np.median(ratios)), replica_means.tolist()


def _telemetry(kind: str, ctx: ParallelContext) -> Telemetry:
    """A sampler of this rank's own device (and of the host), chosen by UUID on CUDA."""
    if kind != "cuda":
        # Sparse on a CPU: the sampler shares the cores it measures, and each wake-up can
        # stall a BLAS thread team; RSS and CPU use change slowly anyway.
        return Telemetry("cpu", interval_s=0.5)
    index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    if uuid and not uuid.startswith(("GPU-", "MIG-")):
        uuid = f"GPU-{uuid}"  # torch prints the bare UUID, NVML wants it prefixed
    return Telemetry("cuda", device_index=index, device_uuid=uuid or None)


def measure_trial(rc: RunConfig, ctx: ParallelContext, *, steps: int, warmup: int,
                  fault: Fault | None) -> Measurement | None:
    kind = rc.workload.hardware.device
    trainer = Trainer(rc, ctx=ctx)
    for i in range(warmup):
        if fault:
            fault.maybe_fire(rank=ctx.rank, step=i + 1)
        trainer.step()
    canary = [_canary(ctx, kind)]
    if kind == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(kind)
    results: list[StepResult] = []
    # Every rank samples its own device, not only rank 0: the run's energy is the sum of its
    # devices' energy counters, and rank 0 alone would understate it by the world size.
    with _telemetry(kind, ctx) as telemetry:
        for i in range(steps):
            if fault:
                fault.maybe_fire(rank=ctx.rank, step=warmup + i + 1)
            with timer.step():
                results.append(trainer.step())
        samples = timer.samples  # on CUDA this synchronizes, so the window holds all the work
    tele = telemetry.summary()
    canary.append(_canary(ctx, kind))
    extra: dict = {}
    if kind == "cuda":
        peak_mem = int(torch.cuda.max_memory_allocated())
    else:
        heaviest = max(results, key=lambda r: (r.max_seq_len, r.padded_tokens))
        peak_mem, extra = _peak_tensor_memory(trainer, heaviest.batch_ids)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gathered = _gather(ctx, (peak_mem, peak_rss, [r.compute_s for r in results],
                             [r.micro_batches for r in results], tele.energy_j))
    if ctx.rank != 0:
        return None
    stats = summarize(samples)
    tokens = sum(r.tokens for r in results)
    flops = sum(r.model_flops for r in results)
    ceiling = matmul_ceiling(rc.precision.dtype, kind)
    # a step that beats the ceiling: the ceiling was measured while the machine was slow
    ceiling = remeasure_if_outrun(ceiling, flops / sum(samples) / ctx.world)
    mfu, source, mfu_extra = _mfu(flops / sum(samples), ceiling, rc, ctx.world)
    energies = [g[4] for g in gathered]
    energy = None if any(e is None for e in energies) else float(sum(energies))
    sched = [r.schedule_s for r in results]
    est = np.array([r.rank_flops for r in results])  # steps x dp ranks
    extra |= mfu_extra | {
        "tokens_per_step": tokens / steps,
        "padded_tokens_per_step": sum(r.padded_tokens for r in results) / steps,
        "padding_fraction": 1 - tokens / sum(r.padded_tokens for r in results),
        "micro_batches_per_step": float(np.mean([np.mean(g[3]) for g in gathered])),
        "recomputed_tokens_per_step": sum(r.recomputed_tokens for r in results) / steps,
        "schedule_s_median": float(np.median(sched)),
        "schedule_fraction": sum(sched) / sum(samples),
        "max_seq_len": max(r.max_seq_len for r in results),
        "losses": [r.loss for r in results],
        "ranks": ctx.world,
        "peak_mem_bytes_per_rank": [g[0] for g in gathered],
    } | tele.to_extra()  # rank 0's own device and host
    if ctx.world > 1:
        extra["telemetry_energy_j_per_rank"] = energies
    if ctx.dp > 1:
        measured, replica_s = _imbalance(ctx, [g[2] for g in gathered], rc)
        extra |= {
            "rank_imbalance": measured,
            "rank_imbalance_estimated": float(np.median(est.max(1) / est.mean(1))),
            "rank_compute_s": replica_s,
            "rank_estimated_flops": est.mean(0).tolist(),
        }
    fingerprint = current_fingerprint(kind, __version__)
    # The machine's speed around the timed steps against its reference speed (CPU only:
    # nothing on a GPU is scaled by a canary).
    canary_s, canary_ref_s = ((float(np.mean(canary)), canary_reference(kind, fingerprint.key()))
                              if kind == "cpu" else (None, None))
    return Measurement(
        status=Status.COMPLETE, tokens_per_s=tokens / sum(samples), step_time_s=stats.median,
        step_time_iqr_s=stats.iqr, step_times_s=samples, warmup_steps=warmup, timed_steps=steps,
        peak_mem_bytes=max(g[0] for g in gathered), peak_rss_bytes=max(g[1] for g in gathered),
        mfu=mfu, mfu_peak_source=source, model_tflops_per_step=flops / steps / 1e12,
        energy_j=energy, energy_per_token_j=energy_per_token(energy, tokens),
        canary_s=canary_s, canary_ref_s=canary_ref_s, extra=extra, fingerprint=fingerprint)


def dump_params(trainer: Trainer, folder: Path, ctx: ParallelContext) -> None:
    """Full (unsharded) parameters of this rank as .npz, for tests that compare replicas and
    runs; every rank calls it, since gathering shards is collective."""
    import io

    arrays = {}
    for name, p in trainer.model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        key = name.removeprefix("decoder.")
        arrays[key] = full.detach().float().cpu().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(folder / f"params-rank{ctx.rank}.npz", buf.getvalue())


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OOM_TEXT)


def _record_failure(args: argparse.Namespace, rc: RunConfig, status: Status, reason: str) -> None:
    m = Measurement(status=status, reason=reason[:300], warmup_steps=args.warmup,
                    fingerprint=current_fingerprint(rc.workload.hardware.device, __version__))
    if args.out:
        atomic_write_text(Path(args.out), m.model_dump_json(indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autotune.train.worker")
    parser.add_argument("config")
    parser.add_argument("--mode", choices=("measure", "train"), required=True)
    parser.add_argument("--steps", type=int, required=True,
                        help="train: 0 builds and initialises only (with --dump-params)")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--out", help="measure: Measurement JSON; train: summary JSON")
    parser.add_argument("--dump-params",
                        help="train: folder for each rank's final parameters (.npz)")
    parser.add_argument("--train-options",
                        help="train: JSON of autotune.train.session.TrainOptions, from "
                        "autotune train (instead of --steps and --log-every)")
    parser.add_argument("--error-out",
                        help="train: where rank 0 writes a refusal (one line) for the caller")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rc = load_yaml(RunConfig, args.config)
    fault = Fault.from_env()
    ctx = init_parallel(rc)
    try:
        if args.mode == "measure":
            result = measure_trial(rc, ctx, steps=args.steps, warmup=args.warmup, fault=fault)
            if result is not None and args.out:
                atomic_write_text(Path(args.out), result.model_dump_json(indent=2))
        else:
            opts = (TrainOptions.from_json(args.train_options) if args.train_options
                    else TrainOptions(steps=args.steps, log_every=args.log_every, eval_every=0))
            summary, trainer = train(rc, ctx, opts, fault=fault)
            if summary is not None and args.out:
                atomic_write_text(Path(args.out), json.dumps(summary, indent=2))
            if args.dump_params:
                dump_params(trainer, Path(args.dump_params), ctx)
        results_written(ctx)
    except Exception as exc:
        if args.mode == "train" and isinstance(exc, UserError):
            # Every rank meets the same refusal (a checkpoint that does not fit the run);
            # rank 0 hands the caller its one line.
            if ctx.rank == 0 and args.error_out:
                atomic_write_text(Path(args.error_out), str(exc))
            print(f"autotune: {exc}", file=sys.stderr)
            return 2
        if args.mode == "measure" and isinstance(exc, UserError):
            # The trainer refused the config before its first step (a foreign kernel tuning
            # cache, a combination only the build can see): the config, not the process,
            # failed. Every rank refuses alike; rank 0 records it, and the group still ends.
            if ctx.rank == 0:
                _record_failure(args, rc, Status.INVALID, str(exc))
            if ctx.distributed:
                raise
            return 0
        # A single process reports its own OOM; among many ranks the others would wait for
        # it forever, so the failure propagates and the launcher tears the group down.
        if ctx.distributed or args.mode != "measure" or not _is_oom(exc):
            raise
        _record_failure(args, rc, Status.OOM,
                        f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
    finally:
        shutdown_parallel(ctx)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
