"""Pipeline parallelism with ``torch.distributed.pipelining`` (GPipe and 1F1B).

Pipeline schedules split one batch tensor into equal micro-batches and pass only
activations between stages, so each step's packed micro-batches are padded to the longest
of them (a padding segment that no one attends to and the loss ignores) and their
positions and segment boundaries are handed to every stage in the order the schedule runs
forwards, which is ascending for both schedules. ChunkFlow's dependent chunks cannot be
served this way; the config rules refuse that combination before anything starts.
"""

from __future__ import annotations

import contextlib
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autotune.data import MicroBatch, SequenceSet, StepPlan
from autotune.train.model import IGNORE_INDEX, Decoder, PackedBatch
from autotune.train.step import materialize

__all__ = ["PipelineRunner", "StageModule"]


class StageModule(nn.Module):
    """One pipeline stage of the decoder: its layers, plus the embedding on the first stage
    and the norm and output head on the last."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder
        self.meta: deque[tuple[torch.Tensor, tuple[int, ...]]] = deque()

    @property
    def layers(self) -> nn.ModuleDict:
        return self.decoder.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions, cu = self.meta.popleft()
        d = self.decoder
        h = d.tok_embeddings(x[0]) if d.tok_embeddings is not None else x[0]
        h, _ = d.run_layers(h, positions, cu)
        if d.output is not None:
            return d.output(d.norm(h)).unsqueeze(0)
        return h.unsqueeze(0)


def _pad(batch: PackedBatch, tokens: int) -> PackedBatch:
    extra = tokens - batch.input_ids.numel()
    if extra == 0:
        return batch
    dev = batch.input_ids.device
    return PackedBatch(
        torch.cat((batch.input_ids, torch.zeros(extra, dtype=torch.long, device=dev))),
        torch.cat((batch.labels, torch.full((extra,), IGNORE_INDEX, device=dev))),
        torch.cat((batch.positions, torch.arange(extra, device=dev))),
        (*batch.cu_seqlens, tokens))


class PipelineRunner:
    """Runs one rank's share of a step through a pipeline schedule."""

    def __init__(self, stage_module: StageModule, ctx, *, schedule: str,
                 autocast_dtype: torch.dtype | None):
        self.module = stage_module
        self.ctx = ctx
        self.schedule = schedule
        self.autocast_dtype = autocast_dtype

    def run(self, plan: StepPlan, seqs: SequenceSet, batch_ids: np.ndarray, *,
            grad_scale: float) -> float:
        """Forward and backward of every micro-batch; the summed loss on the last stage."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        ctx = self.ctx
        # A rank with no sequences still runs one empty micro-batch: its pipeline peers and
        # its gradient reduction expect it.
        mbs: list[MicroBatch] = list(plan.micro_batches()) or [MicroBatch(())]
        batches = [materialize(mb, seqs, batch_ids, ctx.device) for mb in mbs]
        width = max(b.input_ids.numel() for b in batches)
        batches = [_pad(b, width) for b in batches]
        self.module.meta = deque((b.positions, b.cu_seqlens) for b in batches)

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            logits = logits[0].to(torch.promote_types(logits.dtype, torch.float32))
            return F.cross_entropy(logits, target[0], ignore_index=IGNORE_INDEX,
                                   reduction="sum") * grad_scale

        # Static shapes: the schedule would otherwise infer them by running the stage on
        # meta tensors, which the per-micro-batch segment boundaries cannot follow.
        dims = self.module.decoder.dims
        # Float activations carry requires_grad: the stage sizes its gradient buffers by it.
        act = lambda *shape, dtype=torch.float32: torch.empty(  # noqa: E731
            shape, dtype=dtype, device=ctx.device, requires_grad=dtype.is_floating_point)
        inputs = act(1, width, dtype=torch.long) if ctx.is_first_stage else act(1, width, dims.hidden)
        outputs = (act(1, width, dims.vocab, dtype=self.autocast_dtype or torch.float32)
                   if ctx.is_last_stage else act(1, width, dims.hidden))
        stage = PipelineStage(
            self.module, ctx.pp_rank, ctx.pp, ctx.device, input_args=inputs, output_args=outputs,
            output_grads=None if ctx.is_last_stage else outputs,
            input_grads=None if ctx.is_first_stage else inputs, group=ctx.group("pp"))
        cls = ScheduleGPipe if self.schedule == "gpipe" else Schedule1F1B
        sched = cls(stage, n_microbatches=len(batches), loss_fn=loss_fn, scale_grads=False)
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
        return float(sum(float(x) for x in losses)) / grad_scale if losses else 0.0
