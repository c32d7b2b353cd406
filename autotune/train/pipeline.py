"""Pipeline parallelism with ``torch.distributed.pipelining`` (GPipe and 1F1B).

Pipeline schedules split one batch tensor into equal micro-batches and pass only
activations between stages, so each step's packed micro-batches are padded to one width (a
padding segment that no one attends to and the loss ignores): the token budget for pack and
skrull, the longest micro-batch rounded up to a multiple of 256 tokens for the padding
policies, so that few widths ever occur. Stages and schedules are built once per width and
reused. Positions and segments are handed to every stage in the order the schedule runs
forwards, which is ascending for both schedules. Activations travel in the compute dtype.
ChunkFlow's dependent chunks cannot be served this way; the config rules refuse that
combination before anything starts.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import numpy as np
import torch
from torch import nn

from autotune.data import MicroBatch, SequenceSet, StepPlan
from autotune.train.model import Decoder
from autotune.train.step import materialize

_WIDTH_STEP = 256

__all__ = ["PipelineRunner", "StageModule"]


class StageModule(nn.Module):
    """One pipeline stage of the decoder: its layers, plus the embedding on the first stage
    and the norm, output head and loss on the last. The last stage outputs each
    micro-batch's summed loss, not its logits: torch's stage keeps every micro-batch's
    output until the step ends, which for logits is tokens x vocab x 4 bytes each (8.4 GB
    for a 16K-token micro-batch of Llama 3), and the fused loss never makes them whole."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder
        self.meta: deque[tuple[torch.Tensor, Any, torch.Tensor]] = deque()
        # What travels between stages: under autocast the residual stream is fp32, and
        # sending it so would double the bytes on the wire for nothing the next stage keeps.
        self.act_dtype: torch.dtype | None = None

    @property
    def layers(self) -> nn.ModuleDict:
        return self.decoder.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions, segments, labels = self.meta.popleft()
        d = self.decoder
        h = d.tok_embeddings(x[0]) if d.tok_embeddings is not None else x[0]
        h, _ = d.run_layers(h, positions, segments)
        if d.output is not None:
            return d.loss_sum(h, labels).float().reshape(1, 1)
        return h.unsqueeze(0).to(self.act_dtype or h.dtype)


class PipelineRunner:
    """Runs one rank's share of a step through a pipeline schedule."""

    def __init__(self, stage_module: StageModule, ctx: Any, *, schedule: str,
                 autocast_dtype: torch.dtype | None, act_dtype: torch.dtype = torch.float32,
                 budget: int | None = None):
        self.module = stage_module
        self.ctx = ctx
        self.schedule = schedule
        self.autocast_dtype = autocast_dtype
        self.act_dtype = act_dtype
        self.budget = budget  # fixed width: the token budget of pack and skrull
        stage_module.act_dtype = act_dtype
        self._schedules: dict[tuple[int, int], Any] = {}
        self._scale = 1.0  # read by the loss function the schedules were built with

    def _width(self, widest: int) -> int:
        if self.budget is not None and widest <= self.budget:
            return self.budget
        return -(-widest // _WIDTH_STEP) * _WIDTH_STEP

    def _schedule_for(self, width: int, n_micro: int) -> Any:
        """The stage and schedule of this width and micro-batch count, built on first use:
        PipelineStage sizes its buffers and sets up its peers' shapes once."""
        key = (width, n_micro)
        if key not in self._schedules:
            self._schedules[key] = self._build(width, n_micro)
        return self._schedules[key]

    def _build(self, width: int, n_micro: int) -> Any:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        ctx = self.ctx

        def loss_fn(loss: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
            return loss[0, 0] * self._scale  # the stage's own summed loss (StageModule)

        # Static shapes: the schedule would otherwise infer them by running the stage on
        # meta tensors, which the per-micro-batch segments cannot follow.
        dims = self.module.decoder.dims
        # Float activations carry requires_grad: the stage sizes its gradient buffers by it.
        act = lambda *shape, dtype=self.act_dtype: torch.empty(  # noqa: E731
            shape, dtype=dtype, device=ctx.device, requires_grad=dtype.is_floating_point)
        inputs = act(1, width, dtype=torch.long) if ctx.is_first_stage else act(1, width, dims.hidden)
        outputs = act(1, 1, dtype=torch.float32) if ctx.is_last_stage else act(1, width, dims.hidden)
        stage = PipelineStage(
            self.module, ctx.pp_rank, ctx.pp, ctx.device, input_args=inputs, output_args=outputs,
            output_grads=None if ctx.is_last_stage else outputs,
            input_grads=None if ctx.is_first_stage else inputs, group=ctx.group("pp"))
        cls = ScheduleGPipe if self.schedule == "gpipe" else Schedule1F1B
        return cls(stage, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)

    def run(self, plan: StepPlan, seqs: SequenceSet, batch_ids: np.ndarray, *,
            grad_scale: float) -> torch.Tensor:
        """Forward and backward of every micro-batch; the summed loss on the last stage (zero
        elsewhere), on the device."""
        ctx = self.ctx
        # A rank with no sequences still runs one empty micro-batch: its pipeline peers and
        # its gradient reduction expect it.
        mbs: list[MicroBatch] = list(plan.micro_batches()) or [MicroBatch(())]
        width = self._width(max(max(mb.tokens for mb in mbs), 2))
        batches = [materialize(mb, seqs, batch_ids, ctx.device, pad_to=width) for mb in mbs]
        self.module.meta = deque((b.positions, b.segments, b.labels) for b in batches)
        sched = self._schedule_for(width, len(batches))
        self._scale = grad_scale
        losses: list[torch.Tensor] = []
        autocast = (torch.autocast(ctx.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            if ctx.is_first_stage:
                sched.step(torch.stack([b.input_ids for b in batches]))
            elif ctx.is_last_stage:
                sched.step(target=torch.stack([b.labels for b in batches]), losses=losses)
            else:
                sched.step()
        total = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for x in losses:
            total += x.detach()
        return total / grad_scale
