"""``autotune train``'s run on every rank: steps from a fresh start or a checkpoint to
``--steps``, with periodic checkpoints, held-out evaluation, metrics, a progress bar and a
Hugging Face export of the final weights."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.config import RunConfig
from autotune.errors import UserError
from autotune.train import checkpoint
from autotune.train.distributed import ParallelContext
from autotune.train.faults import Fault
from autotune.train.metrics import MetricsLog
from autotune.train.trainer import StepResult, Trainer

__all__ = ["Start", "StopRequest", "TrainOptions", "resolve", "train"]

log = logging.getLogger("autotune.train")
DEFAULT_SAVE_EVERY = 500


@dataclass
class TrainOptions:
    steps: int  # the run's total, counted from its start: a resumed run stops there too
    log_every: int = 10
    save: Path | None = None
    save_every: int | None = None  # None: DEFAULT_SAVE_EVERY; a checkpoint ends the run anyway
    keep: int | None = None  # the latest K checkpoints; None: all
    resume: Path | None = None
    force: bool = False
    eval_every: int | None = None  # None: once, at the end; 0: never
    eval_sequences: int = 64
    log_dir: Path | None = None  # None: the save folder, if any
    export_hf: Path | None = None

    @property
    def metrics_dir(self) -> Path | None:
        return self.log_dir or self.save

    def to_json(self) -> str:
        """What ``autotune train`` hands each rank (``worker --train-options``)."""
        return json.dumps({k: str(v) if isinstance(v, Path) else v
                           for k, v in dataclasses.asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> TrainOptions:
        values = json.loads(text)
        return cls(**{k: Path(v) if k in _PATHS and v is not None else v
                      for k, v in values.items()})


_PATHS = ("save", "resume", "log_dir", "export_hf")


@dataclass(frozen=True)
class Start:
    """Where a run starts: its RunConfig (a cosine horizon resolved), the checkpoint it
    resumes, and what the resume changes (one line each)."""

    rc: RunConfig
    ckpt: checkpoint.Checkpoint | None
    notes: list[str]


def horizon(rc: RunConfig, steps: int) -> RunConfig:
    """``rc`` with a cosine schedule's unset horizon set to the run's length: the checkpoint
    records it, so a resume with another ``--steps`` cannot silently bend the schedule."""
    o = rc.optimizer
    if o.lr_schedule != "cosine" or o.decay_steps is not None:
        return rc
    if steps <= o.warmup_steps:
        raise UserError(f"optimizer: a cosine schedule over {steps} steps leaves nothing after "
                        f"{o.warmup_steps} warm-up steps")
    return rc.model_copy(update={"optimizer": o.model_copy(update={"decay_steps": steps})})


def resolve(rc: RunConfig, opts: TrainOptions) -> Start:
    """Where the run starts, every problem refused as a UserError before any rank builds
    anything."""
    rc = horizon(rc, opts.steps)
    if opts.export_hf is not None and rc.parallel.pp > 1:
        raise UserError("--export-hf gathers the whole model, which pipeline stages do not "
                        "hold: resume the checkpoint with parallel.pp 1 to export it")
    if opts.eval_every and not _can_evaluate(rc):
        raise UserError("--eval-every: evaluation needs parallel.pp 1 and a synthetic data "
                        "preset, which the held-out set is drawn from")
    if opts.resume is None:
        _refuse_overwrite(opts)
        return Start(rc, None, [])
    ckpt = checkpoint.find(opts.resume)
    if ckpt is None:
        return Start(rc, None, [f"{opts.resume} holds no checkpoint yet: starting at step 0"])
    notes = checkpoint.compare(ckpt.runconfig, rc, where=ckpt.path, force=opts.force)
    if ckpt.step > opts.steps:
        raise UserError(f"{ckpt.path}: the checkpoint is at step {ckpt.step}, past "
                        f"--steps {opts.steps}")
    return Start(rc, ckpt, notes)


def _refuse_overwrite(opts: TrainOptions) -> None:
    """A fresh run would overwrite another run's checkpoints as it reaches their steps, and
    its metrics from the first step: the same command without --resume is a slip."""
    from autotune.train.metrics import read_metrics

    if opts.save is not None and opts.save.is_dir():
        held = checkpoint.find(opts.save)
        if held is not None:
            raise UserError(f"{opts.save} holds a checkpoint at step {held.step}: add "
                            f"--resume {opts.save} to continue that run, or save elsewhere")
    if opts.metrics_dir is not None and read_metrics(opts.metrics_dir):
        raise UserError(f"{opts.metrics_dir} holds the metrics of another run: add --resume "
                        "to continue it, or log elsewhere")


class StopRequest:
    """SIGTERM or SIGINT (a scheduler's preemption notice, Ctrl-C) while a run saves
    checkpoints: the rank finishes its step, then every rank saves and stops together, so
    the run resumes from where it was stopped. In a single process a second SIGINT stops
    at once; ranks ignore repeats (the launcher and autotune train both pass one on)."""

    def __init__(self, *, repeat_interrupts: bool = False) -> None:
        self.signum = 0
        self.repeat_interrupts = repeat_interrupts

    def _note(self, signum: int, frame: Any) -> None:
        if self.repeat_interrupts and self.signum == signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    @contextlib.contextmanager
    def armed(self, enabled: bool) -> Iterator[StopRequest]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {sig: signal.signal(sig, self._note) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def agreed(self, ctx: ParallelContext) -> int:
        """The signal any rank received (0: none), the same on every rank. One 8-byte
        all-reduce per step: ranks signalled a moment apart must stop at the same step."""
        if not ctx.distributed:
            return self.signum
        import torch
        import torch.distributed as dist

        t = torch.tensor([self.signum], dtype=torch.int64, device=ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def _can_evaluate(rc: RunConfig) -> bool:
    return rc.parallel.pp == 1 and rc.workload.data.path is None


def export_hf(trainer: Trainer, out: Path) -> list[Path]:
    """The whole model gathered to rank 0 (collective) and written as safetensors with a
    config.json for transformers; other ranks return []."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from autotune.train.hf_export import write_hf

    state = get_model_state_dict(trainer.decoder, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    if trainer.ctx.rank != 0:
        return []
    spec = trainer.rc.workload.model
    return write_hf(state, trainer.dims, out,
                    hf_config=Path(spec.hf_config) if spec.hf_config else None)


def train(rc: RunConfig, ctx: ParallelContext, opts: TrainOptions, *,
          fault: Fault | None = None, start: Start | None = None) -> tuple[dict | None, Trainer]:
    """Train to ``opts.steps`` (every rank calls it) from ``start`` (``resolve``'s, which
    this calls where the caller has not); rank 0 returns the run's summary."""
    from profilers.progress import progress

    begin = start or resolve(rc, opts)
    rc, ckpt = begin.rc, begin.ckpt
    rank0 = ctx.rank == 0
    trainer = Trainer(rc, ctx=ctx, time_compute=False)
    if ckpt is not None:
        checkpoint.load(trainer, ckpt)
    first = trainer.step_count
    held_out = None
    if opts.eval_every != 0 and _can_evaluate(rc):
        from autotune.data import load_eval_dataset

        held_out = load_eval_dataset(rc.workload.data, trainer.dims, opts.eval_sequences)
    metrics = MetricsLog(opts.metrics_dir, resume_step=first, enabled=rank0)
    history: list[tuple[StepResult, float]] = []
    evals: list[dict[str, Any]] = []
    saved: list[str] = []

    def run_eval(step: int) -> None:
        loss = trainer.evaluate(held_out.sequences)
        evals.append({"step": step, "eval_loss": loss})
        metrics.write("eval", step, loss=loss)
        if rank0:
            log.info("step %d eval loss %.4f", step, loss)

    bar = progress(total=opts.steps, initial=first, unit="step", desc=rc.label(),
                   enabled=rank0, leave=False)
    stopped = 0
    with StopRequest(repeat_interrupts=not ctx.distributed).armed(opts.save is not None) as stop:
        try:
            stopped = _steps(trainer, opts, first, fault, stop, bar, metrics, history, saved,
                             run_eval if held_out is not None else None)
            # A resume with nothing left to train has its evaluation in the log already.
            if held_out is not None and history and not stopped and (
                    not evals or evals[-1]["step"] != trainer.step_count):
                run_eval(trainer.step_count)
        finally:
            bar.close()
            metrics.close()
    exported = (export_hf(trainer, opts.export_hf)
                if opts.export_hf is not None and not stopped else [])
    if not rank0:
        return None, trainer
    tokens = sum(r.tokens for r, _ in history)
    seconds = sum(dt for _, dt in history)
    return {"config": rc.label(), "ranks": ctx.world, "start_step": first,
            "final_step": trainer.step_count, "steps": len(history),
            "final_loss": history[-1][0].loss if history else None,
            "losses": [r.loss for r, _ in history], "grad_norms": [r.grad_norm for r, _ in history],
            "tokens": tokens, "tokens_per_s": tokens / seconds if seconds else None,
            "wall_s": seconds, "eval": evals, "checkpoints": saved,
            "resumed_from": str(ckpt.path) if ckpt is not None else None,
            "stopped_by": signal.Signals(stopped).name if stopped else None,
            "notes": begin.notes, "exported": [str(p) for p in exported]}, trainer


def _steps(trainer: Trainer, opts: TrainOptions, start: int, fault: Fault | None,
           stop: StopRequest, bar: Any, metrics: MetricsLog,
           history: list[tuple[StepResult, float]], saved: list[str],
           run_eval: Any) -> int:
    """Steps ``start + 1`` to ``opts.steps``; returns the signal that stopped them early
    (after a checkpoint of the last step run), or 0."""
    ctx, rank0 = trainer.ctx, trainer.ctx.rank == 0
    save_every = opts.save_every or DEFAULT_SAVE_EVERY

    def save() -> None:
        saved.append(str(checkpoint.save(trainer, opts.save, fault=fault)))
        if rank0 and opts.keep:
            checkpoint.prune(opts.save, opts.keep)

    for step in range(start + 1, opts.steps + 1):
        if fault:
            fault.maybe_fire(rank=ctx.rank, step=step)
        t0 = time.perf_counter()
        r = trainer.step()
        dt = time.perf_counter() - t0
        lr = trainer.optimizer.param_groups[0]["lr"]  # the rate this step applied
        history.append((r, dt))
        metrics.write("train", r.step, loss=r.loss, lr=lr, tokens=r.tokens,
                      tokens_per_s=r.tokens / dt, grad_norm=r.grad_norm, step_s=dt)
        bar.update(1)
        bar.set_postfix(loss=f"{r.loss:.4f}", tok_s=f"{r.tokens / dt:,.0f}")
        if rank0 and bar.disable and (r.step % opts.log_every == 0 or r.step == opts.steps):
            log.info("step %d loss %.4f tokens %d tok/s %.0f", r.step, r.loss, r.tokens,
                     r.tokens / dt)
        if run_eval is not None and opts.eval_every and r.step % opts.eval_every == 0:
            run_eval(r.step)
        if opts.save is None:
            continue
        if r.step % save_every == 0 or r.step == opts.steps:
            save()
        signum = stop.agreed(ctx)
        if signum and r.step < opts.steps:
            if saved[-1:] != [str(opts.save / checkpoint.dirname(r.step))]:
                save()
            return signum
    return 0
