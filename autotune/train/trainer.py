"""The reference trainer: data, model, optimizer and one step at a time."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from autotune.config import RunConfig
from autotune.data import Dataset, StepPlan, global_batches, load_dataset, make_policy
from autotune.train.flops import model_flops
from autotune.train.model import Decoder
from autotune.train.step import StepExecutor

__all__ = ["StepResult", "Trainer"]

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: int
    loss: float  # token-mean cross-entropy over the global batch
    tokens: int  # real tokens, padding excluded
    padded_tokens: int  # tokens the model processed, padding included
    micro_batches: int
    recomputed_tokens: int
    max_seq_len: int
    schedule_s: float
    model_flops: float
    batch_ids: np.ndarray  # which sequences the step trained on


class Trainer:
    """Builds everything a RunConfig names and trains it step by step.

    Deterministic by ``rc.seed``: initial weights and the order of global batches follow it,
    so two trainers of one RunConfig see the same data and start from the same weights.
    """

    def __init__(self, rc: RunConfig, *, dataset: Dataset | None = None,
                 device: torch.device | None = None):
        self.rc = rc
        self.dims = rc.workload.model.resolve()
        self.device = device or torch.device(rc.workload.hardware.device)
        self.dataset = dataset if dataset is not None else load_dataset(rc.workload.data, self.dims)
        torch.manual_seed(rc.seed)
        self.model = Decoder(self.dims, attention=rc.kernels.attention,
                             checkpoint_layers=rc.checkpointing.checkpointed_layers(self.dims.layers)
                             ).to(self.device)
        opt = rc.optimizer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.lr,
                                           betas=(opt.beta1, opt.beta2),
                                           weight_decay=opt.weight_decay, foreach=True)
        self.policy = make_policy(rc, self.dims, data_max_len=self.dataset.max_len)
        self.batches = global_batches(self.dataset.lengths,
                                      global_batch_tokens=rc.workload.budget.global_batch_tokens,
                                      seed=rc.seed)
        autocast = torch.bfloat16 if rc.precision.dtype == "bf16" else None
        self.executor = StepExecutor(self.model, self.dataset.sequences, device=self.device,
                                     autocast_dtype=autocast)
        self.step_count = 0

    def _lr_scale(self) -> float:
        warm = self.rc.optimizer.warmup_steps
        return min(1.0, (self.step_count + 1) / warm) if warm else 1.0

    def next_plan(self, batch_ids: np.ndarray | None = None) -> tuple[np.ndarray, StepPlan, float]:
        """The next global batch (or the given one), its plan, and the seconds planning took."""
        ids = next(self.batches) if batch_ids is None else batch_ids
        t0 = time.perf_counter()
        plan = self.policy.plan(self.dataset.lengths[ids])
        return ids, plan, time.perf_counter() - t0

    def step(self, batch_ids: np.ndarray | None = None) -> StepResult:
        """One optimizer step on the next global batch, or on ``batch_ids`` (a replay that
        leaves the stream where it was)."""
        ids, plan, sched_s = self.next_plan(batch_ids)
        for group in self.optimizer.param_groups:
            group["lr"] = self.rc.optimizer.lr * self._lr_scale()
        out = self.executor.run(plan, ids)
        if self.rc.optimizer.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.rc.optimizer.grad_clip,
                                           foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lengths = self.dataset.lengths[ids]
        self.step_count += 1
        return StepResult(
            step=self.step_count, loss=out.loss_sum / out.targets, tokens=int(lengths.sum()),
            padded_tokens=plan.tokens, micro_batches=plan.n_micro,
            recomputed_tokens=plan.recomputed_tokens(), max_seq_len=int(lengths.max()),
            schedule_s=sched_s, model_flops=model_flops(self.dims, lengths), batch_ids=ids)
