"""Measure a RunConfig for real: the single place that runs a config and reports its speed.

``measure`` runs the trainer in a child process (``python -m autotune.measure``) under a
timeout and the workload's memory cap, so that an OOM, a crash or a hang becomes a
Measurement with that status. The child discards warm-up steps, times the rest (every raw
sample kept), then replays the heaviest timed step once under a tensor-memory tracker for
the tensor-level peak memory (CPU allocators keep no such statistic; tracking costs too much
to run on the timed steps).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np

from autotune import __version__
from autotune.config import RunConfig, load_yaml, save_yaml
from profilers.ceilings import Ceiling, datasheet_peak, matmul_ceiling
from profilers.fingerprint import current_fingerprint
from profilers.isolation import run_isolated
from profilers.memory import TensorMemoryTracker
from profilers.records import Measurement, Status
from profilers.store import atomic_write_text
from profilers.timer import StepTimer, summarize

__all__ = ["measure"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 900.0
_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")


def _device_kind(rc: RunConfig) -> str:
    return rc.workload.hardware.device


def measure(rc: RunConfig, *, steps: int = 5, warmup: int = 1,
            timeout_s: float = DEFAULT_TIMEOUT_S, workdir: Path | None = None) -> Measurement:
    """Run ``rc`` in an isolated process and return what happened.

    Args:
        rc: the config; it must be valid (RunConfig validates on construction).
        steps: timed optimizer steps.
        warmup: discarded steps before them.
        timeout_s: wall-clock limit of the whole trial, set-up included.
        workdir: where ``config.yaml``, ``metrics.json`` and ``log.txt`` go; a temporary
            folder when None.
    """
    kind = _device_kind(rc)
    # Measured here, before the trial's clock starts; the child then reads the stored figure.
    matmul_ceiling(rc.precision.dtype, kind)
    with tempfile.TemporaryDirectory(prefix="autotune-measure-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cfg, out, log_path = work / "config.yaml", work / "metrics.json", work / "log.txt"
        save_yaml(rc, cfg)
        out.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "autotune.measure", str(cfg), "--steps", str(steps),
                "--warmup", str(warmup), "--out", str(out)]
        cap = int(rc.workload.budget.memory_cap_gb * 2**30) if kind == "cpu" else None
        run = run_isolated(argv, timeout_s=timeout_s, mem_cap_bytes=cap, log_path=log_path)
        if out.is_file():
            m = Measurement.model_validate_json(out.read_text())
            m.peak_rss_bytes = max(m.peak_rss_bytes or 0, run.peak_rss_bytes) or None
            if m.status is not Status.COMPLETE:
                m.log_tail = run.log_tail
            return m
        status, reason = run.status, run.reason
        if status is Status.COMPLETE:
            status, reason = Status.CRASHED, "the trial exited without writing its result"
        return Measurement(status=status, reason=reason, warmup_steps=warmup,
                           peak_rss_bytes=run.peak_rss_bytes or None, log_tail=run.log_tail,
                           fingerprint=current_fingerprint(kind, __version__))


# ---- the child side -------------------------------------------------------------------------

def _peak_tensor_memory(trainer, batch_ids: np.ndarray) -> tuple[int, dict[str, int]]:
    """Replay one step under the tensor tracker: peak bytes of live tensors, and how much of
    that was there before the step (parameters, gradients, optimizer state)."""
    import torch

    state = [t for s in trainer.optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor)]
    params = list(trainer.model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    with TensorMemoryTracker(existing=params + grads + state) as tracker:
        trainer.step(batch_ids)
    return tracker.peak_bytes, {"mem_state_bytes": tracker.baseline_bytes,
                                "mem_step_peak_bytes": tracker.peak_bytes - tracker.baseline_bytes}


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _mfu(flops_per_s: float, ceiling: Ceiling, rc: RunConfig) -> tuple[float, str, dict]:
    source = (f"measured {ceiling.dtype} matmul ceiling {ceiling.flops_per_s / 1e9:.1f} GFLOP/s "
              f"of this machine ({ceiling.method}; fingerprint {ceiling.fingerprint_key})")
    extra: dict[str, float | str] = {}
    name = rc.workload.hardware.device_name
    if rc.workload.hardware.device == "cuda":
        import torch

        name = name or torch.cuda.get_device_name(0)
        peak = datasheet_peak(name, rc.precision.dtype)
        if peak:
            extra["mfu_datasheet"] = flops_per_s / peak
            extra["datasheet_peak_flops"] = peak
    return flops_per_s / ceiling.flops_per_s, source, extra


def _run_trial(rc: RunConfig, steps: int, warmup: int) -> Measurement:
    import torch

    from autotune.train.trainer import Trainer

    kind = _device_kind(rc)
    if rc.workload.hardware.cpu_threads:
        torch.set_num_threads(rc.workload.hardware.cpu_threads)
    trainer = Trainer(rc)
    rss_setup = _rss_bytes()
    for _ in range(warmup):
        trainer.step()
    if kind == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(kind)
    results = []
    for _ in range(steps):
        with timer.step():
            results.append(trainer.step())
    samples = timer.samples
    stats = summarize(samples)
    tokens = sum(r.tokens for r in results)
    flops = sum(r.model_flops for r in results)
    extra: dict = {}
    if kind == "cuda":
        peak_mem: int | None = int(torch.cuda.max_memory_allocated())
    else:
        heaviest = max(results, key=lambda r: (r.max_seq_len, r.padded_tokens))
        peak_mem, extra = _peak_tensor_memory(trainer, heaviest.batch_ids)
    ceiling = matmul_ceiling(rc.precision.dtype, kind)
    mfu, source, mfu_extra = _mfu(flops / sum(samples), ceiling, rc)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sched = [r.schedule_s for r in results]
    extra |= mfu_extra | {
        "tokens_per_step": tokens / steps,
        "padded_tokens_per_step": sum(r.padded_tokens for r in results) / steps,
        "padding_fraction": 1 - tokens / sum(r.padded_tokens for r in results),
        "micro_batches_per_step": sum(r.micro_batches for r in results) / steps,
        "recomputed_tokens_per_step": sum(r.recomputed_tokens for r in results) / steps,
        "schedule_s_median": float(np.median(sched)),
        "schedule_fraction": sum(sched) / sum(samples),
        "max_seq_len": max(r.max_seq_len for r in results),
        "losses": [r.loss for r in results],
        "rss_after_setup_bytes": rss_setup,
    }
    return Measurement(
        status=Status.COMPLETE, tokens_per_s=tokens / sum(samples), step_time_s=stats.median,
        step_time_iqr_s=stats.iqr, step_times_s=samples, warmup_steps=warmup, timed_steps=steps,
        peak_mem_bytes=peak_mem, peak_rss_bytes=peak_rss, mfu=mfu, mfu_peak_source=source,
        model_tflops_per_step=flops / steps / 1e12, extra=extra,
        fingerprint=current_fingerprint(kind, __version__))


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OOM_TEXT)


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autotune.measure")
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rc = load_yaml(RunConfig, args.config)
    try:
        m = _run_trial(rc, args.steps, args.warmup)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        m = Measurement(status=Status.OOM, reason=f"{type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                        warmup_steps=args.warmup,
                        fingerprint=current_fingerprint(_device_kind(rc), __version__))
    atomic_write_text(Path(args.out), m.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(child_main())
