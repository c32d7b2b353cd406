"""The reference trainer: data, model, parallelism, optimizer, and one step at a time."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from autotune.config import RunConfig
from autotune.config._runconfig import PADDED_POLICIES
from autotune.data import (
    Dataset,
    MicroBatch,
    Segment,
    SequenceSet,
    StepPlan,
    load_dataset,
    make_policy,
    plan_step,
    step_plans,
)
from autotune.data.context_parallel import Placer
from autotune.data.cost import plan_flops
from autotune.errors import UserError
from autotune.train.adaptive import AdaptiveCheckpointing
from autotune.train.distributed import ParallelContext
from autotune.train.flops import model_flops
from autotune.train.parallelize import build_model
from autotune.train.pipeline import PipelineRunner
from autotune.train.step import CPShareOf, StepExecutor, materialize

__all__ = ["PendingStep", "StepResult", "Trainer", "clip_grad_norm", "make_optimizer"]

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: int
    loss: float  # token-mean cross-entropy over the global batch
    tokens: int  # real tokens of the global batch, padding excluded
    padded_tokens: int  # tokens all ranks processed, padding included
    micro_batches: int  # on this rank
    recomputed_tokens: int  # on this rank
    max_seq_len: int
    schedule_s: float
    model_flops: float  # of the global batch
    batch_ids: np.ndarray  # which sequences the step trained on
    compute_s: float = 0.0  # this rank's forward/backward before the gradient reduction
    rank_flops: list[float] = field(default_factory=list)  # estimated, per data-parallel rank
    grad_norm: float | None = None  # before clipping; None when clipping is off


def _copies(t: torch.Tensor, ctx: ParallelContext) -> int:
    """How many ranks hold this exact tensor: every rank of its pipeline stage for a plain
    tensor, else the stage ranks outside its mesh times its replicated mesh dims."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    stage_ranks = ctx.replicas * ctx.tp
    mesh = getattr(t, "device_mesh", None)
    if mesh is None:
        return stage_ranks
    replicated = 1
    with unset_fake_temporarily():  # mesh bookkeeping, real even when the tensors are fake
        for size, placement in zip(mesh.mesh.shape, t.placements):
            if placement.is_replicate():
                replicated *= size
        return stage_ranks // mesh.size() * replicated


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float,
                   ctx: ParallelContext) -> torch.Tensor:
    """Clip by the norm over the whole model: shards (DTensor, tensor- and data-parallel)
    and pipeline stages included. Each rank sums the squares of its local shards, each
    divided by its number of identical copies, so that one all-reduce over all ranks gives
    the global sum (instead of one reduction per sharded parameter). Returns the norm before
    clipping, on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for g in grads:
        local = g.to_local() if hasattr(g, "to_local") else g
        sq += torch.linalg.vector_norm(local, dtype=torch.float32).square() / _copies(g, ctx)
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        local = g.to_local() if hasattr(g, "to_local") else g
        local.mul_(coef.to(local.dtype))
    return norm


def make_optimizer(params: list[torch.nn.Parameter], rc: RunConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW over fp32 (master) parameters: fused (one kernel for the whole update, no
    per-parameter host reads of the step count) where torch has it for the parameters'
    kind, else foreach; plain per-parameter loops only for lists that mix DTensor and
    plain tensors, which tensor parallelism alone leaves (sharded projections beside
    replicated norms) and which the multi-tensor kernels refuse."""
    opt = rc.optimizer
    kinds = {hasattr(p, "full_tensor") for p in params}
    fast = {"fused": True} if len(kinds) == 1 else {"foreach": False}
    return torch.optim.AdamW(params, lr=opt.lr, betas=(opt.beta1, opt.beta2),
                             weight_decay=opt.weight_decay, **fast)


class Trainer:
    """Builds everything a RunConfig names and trains it step by step, on one process or as
    one rank of many (``ctx``).

    Deterministic by ``rc.seed``: initial weights and the order of global batches follow it.
    The model is built on the meta device, cut, sharded and only then allocated on this
    rank's device and initialised there (``parallelize.build_model``), with weights that
    depend on the seed alone, whatever the layout; every rank plans the same global batch,
    then runs its data-parallel share.

    ``time_compute``: on CUDA, synchronize once per step to time the forward and backward
    passes apart from the gradient reduction (``StepResult.compute_s``), as measurements
    need; training runs leave the device queue alone.
    """

    def __init__(self, rc: RunConfig, *, dataset: Dataset | None = None,
                 device: torch.device | None = None, ctx: ParallelContext | None = None,
                 time_compute: bool = True):
        self.rc = rc
        self.dims = rc.workload.model.resolve()
        self.ctx = ctx or ParallelContext(device=device or torch.device(rc.workload.hardware.device))
        self.device = self.ctx.device
        self.dataset = dataset if dataset is not None else load_dataset(rc.workload.data, self.dims)
        torch.manual_seed(rc.seed)
        from kernels import tuned
        from kernels.cache import CacheMismatch

        try:  # a foreign or broken cache is refused here, before any step
            # The device this process really runs on: a CUDA run planned on a CPU under
            # FakeTensorMode has no CUDA cache to read.
            tuned.activate(tuned.KernelChooser.for_run(
                rc.kernels, rc.precision.dtype, self.device.type))
        except CacheMismatch as exc:
            raise UserError(str(exc)) from None
        self.mixed_precision = rc.precision.dtype == "bf16" and self.ctx.replicas > 1
        # Under FSDP2's mixed precision the parameters are cast for compute; elsewhere bf16
        # is autocast around fp32 parameters.
        autocast = (torch.bfloat16 if rc.precision.dtype == "bf16" and not self.mixed_precision
                    else None)
        self.decoder, self.model = build_model(rc, self.ctx, self.dims)
        self.pipeline: PipelineRunner | None = None
        if self.ctx.pp > 1:
            self.pipeline = PipelineRunner(
                self.model, self.ctx, schedule=rc.parallel.pp_schedule, autocast_dtype=autocast,
                act_dtype=torch.bfloat16 if rc.precision.dtype == "bf16" else torch.float32,
                budget=(None if rc.schedule.policy in PADDED_POLICIES
                        else rc.schedule.micro_batch_tokens))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, rc, self.device)
        self.policy = make_policy(rc, self.dims, data_max_len=self.dataset.max_len)
        static = rc.compile == "blocks" and rc.schedule.policy not in PADDED_POLICIES
        self.executor = StepExecutor(self.model, self.dataset.sequences, device=self.device,
                                     autocast_dtype=autocast, adaptive=self._adaptive(rc),
                                     pad_to=rc.schedule.micro_batch_tokens if static else 0,
                                     cp=self._cp_share(rc))
        p = rc.parallel
        dp = self.ctx.replicas > 1
        self._per_step = dp and self.ctx.pp == 1 and p.reduce_per_step(rc.schedule.policy)
        # Sharded parameters are gathered, and gradients reduced, per micro-batch; pipeline
        # peers exchange per micro-batch: every data-parallel rank must run as many.
        self._lockstep = dp and (p.zero_stage == 3 or self.ctx.pp > 1 or not self._per_step)
        self.seek(0)
        # ZeRO 1/2 reducing once per step: parameters stay gathered from the first forward to
        # the step's gradient reduction, so micro-batches issue no collectives and ranks need
        # not keep step (at the memory cost of unsharded parameters for the whole step).
        self._hold_unsharded = self._per_step and p.zero_stage in (1, 2)
        self.time_compute = time_compute

    def _cp_share(self, rc: RunConfig) -> CPShareOf | None:
        if self.ctx.cp == 1:
            return None
        return CPShareOf(Placer.of(rc, self.dims), self.ctx.cp_rank, self.ctx.group("cp"))

    def _adaptive(self, rc: RunConfig) -> AdaptiveCheckpointing | None:
        ck = rc.checkpointing
        if ck.policy != "adaptive":
            return None
        # parameters, gradients and two AdamW moments of this rank's (local) shards
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.params)
        return AdaptiveCheckpointing(self.dims, budget_bytes=ck.memory_budget_gb * 1e9,
                                     state_bytes=local * 4 * 4,
                                     act_bytes=rc.precision.itemsize)

    def seek(self, step: int) -> None:
        """Continue as if ``step`` steps had run: the next global batch is the stream's
        ``step``-th and the learning rate is that step's (a resumed checkpoint)."""
        self.step_count = step
        self.batches = step_plans(self.rc, self.dataset.lengths, self.dims, start=step,
                                  lockstep=self._lockstep)

    def next_plans(self, batch_ids: np.ndarray | None = None
                   ) -> tuple[np.ndarray, list[StepPlan], float]:
        """The next global batch (or the given one), one plan per data-parallel rank, and the
        seconds planning took."""
        if batch_ids is None:
            b = next(self.batches)
        else:
            b = plan_step(self.policy, self.dataset.lengths, batch_ids, self.ctx.dp,
                          lockstep=self._lockstep)
        return b.ids, b.ranks, b.plan_s

    def next_plan(self, batch_ids: np.ndarray | None = None) -> tuple[np.ndarray, StepPlan, float]:
        ids, plans, sched_s = self.next_plans(batch_ids)
        return ids, plans[self.ctx.dp_rank], sched_s

    def _forward_backward(self, plan: StepPlan, ids: np.ndarray, targets: int) -> torch.Tensor:
        scale = self.ctx.replicas / targets  # gradient reduction averages over dp x cp ranks
        if self.pipeline is not None:
            return self.pipeline.run(plan, self.dataset.sequences, ids, grad_scale=scale)
        if self._per_step:
            self.model.set_requires_gradient_sync(False)
            if self._hold_unsharded:
                self.model.set_reshard_after_backward(False)
        return self.executor.run(plan, ids, grad_scale=scale).loss_sum

    def _reduce_grads(self) -> None:
        if self._per_step:
            self.model.set_requires_gradient_sync(True)
            if self._hold_unsharded:
                self.model.set_reshard_after_backward(True)
            self.executor.sync_pass()

    def _global_loss_sum(self, local: torch.Tensor) -> torch.Tensor:
        if not self.ctx.distributed:
            return local
        import torch.distributed as dist

        # Counted once per data-parallel replica: by its last stage's first tp rank.
        counts = self.ctx.is_last_stage and self.ctx.tp_rank == 0
        t = local.to(torch.float64) if counts else torch.zeros_like(local, dtype=torch.float64)
        dist.all_reduce(t)
        return t

    @torch.no_grad()
    def evaluate(self, seqs: SequenceSet, *, micro_batch_tokens: int = 4096) -> float:
        """Token-mean cross-entropy on ``seqs`` (a held-out set), the same on every rank:
        each rank runs every micro-batch, so sharded and tensor-parallel layers always meet
        their peers and no rank's share decides the figure. The set is small next to
        training, so the repeated work is cheap; packing is the same for every config, so
        configs are judged alike."""
        if self.pipeline is not None:
            raise UserError("evaluation under pipeline parallelism is not supported; "
                            "measure the config with pp=1")
        units: list[list[Segment]] = [[]]
        for i, n in enumerate(seqs.lengths.tolist()):
            if units[-1] and sum(s.padded for s in units[-1]) + n > micro_batch_tokens:
                units.append([])
            units[-1].append(Segment(i, 0, n, n))
        ids = np.arange(len(seqs))
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                    if self.rc.precision.dtype == "bf16" else contextlib.nullcontext())
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with autocast:
            for segments in units:
                loss_sum, _ = self.model(materialize(MicroBatch(tuple(segments)), seqs, ids,
                                                     self.device))
                total += loss_sum
        return float(total) / int((seqs.lengths - 1).sum())

    def step(self, batch_ids: np.ndarray | None = None) -> StepResult:
        """One optimizer step on the next global batch, or on ``batch_ids`` (a replay that
        leaves the stream where it was)."""
        return self.launch_step(batch_ids).result()

    def launch_step(self, batch_ids: np.ndarray | None = None) -> PendingStep:
        """The step's work queued on the device, nothing read back: the loss and gradient
        norm stay device tensors until ``result()`` (under ``FakeTensorMode`` there is
        nothing to read)."""
        ids, plans, sched_s = self.next_plans(batch_ids)
        plan = plans[self.ctx.dp_rank]
        lengths = self.dataset.lengths[ids]
        targets = int((lengths - 1).sum())
        for group in self.optimizer.param_groups:
            group["lr"] = self.rc.optimizer.lr * self.rc.optimizer.lr_factor(self.step_count)
        t0 = time.perf_counter()
        local_loss = self._forward_backward(plan, ids, targets)
        if self.time_compute and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute_s = time.perf_counter() - t0
        self._reduce_grads()
        grad_norm = None
        if self.rc.optimizer.grad_clip is not None:
            # The optimizer's own step and zero_grad carry torch's scopes; clipping needs ours.
            with torch.profiler.record_function("autotune:clip_grad"):
                grad_norm = clip_grad_norm(self.params, self.rc.optimizer.grad_clip, self.ctx)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return PendingStep(
            loss_sum=self._global_loss_sum(local_loss), grad_norm=grad_norm, targets=targets,
            host=StepResult(
                step=self.step_count, loss=float("nan"),
                tokens=int(lengths.sum()), padded_tokens=sum(p.tokens for p in plans),
                micro_batches=plan.n_micro, recomputed_tokens=plan.recomputed_tokens(),
                max_seq_len=int(lengths.max()), schedule_s=sched_s,
                model_flops=model_flops(self.dims, lengths), batch_ids=ids, compute_s=compute_s,
                rank_flops=[plan_flops(p, self.dims) for p in plans]))


@dataclass
class PendingStep:
    """A launched step: its device-side figures, and everything known on the host."""

    loss_sum: torch.Tensor  # summed over the global batch's targets, on every rank
    grad_norm: torch.Tensor | None
    targets: int
    host: StepResult

    def result(self) -> StepResult:
        """The step's one read-back from the device: loss and gradient norm together."""
        parts = [self.loss_sum.to(torch.float64)]
        if self.grad_norm is not None:
            parts.append(self.grad_norm.to(torch.float64))
        figures = torch.stack(parts).tolist()
        self.host.loss = figures[0] / self.targets
        self.host.grad_norm = figures[1] if self.grad_norm is not None else None
        return self.host
