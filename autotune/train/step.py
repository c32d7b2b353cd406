"""Forward and backward of one step's plan, for every scheduling policy alike.

The loss of every micro-batch is its summed token cross-entropy divided by the number of
target tokens in the whole global batch, so gradients accumulate to the token mean over the
global batch whatever the grouping, padding, chunking or accumulation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from autotune.data import ChunkGroup, MicroBatch, SequenceSet, StepPlan
from autotune.data.context_parallel import Placer
from autotune.train.adaptive import AdaptiveCheckpointing
from autotune.train.model import IGNORE_INDEX, KV, Decoder, PackedBatch
from kernels.attention import Segments, to_device

__all__ = ["CPShareOf", "StepExecutor", "materialize"]


def materialize(mb: MicroBatch, seqs: SequenceSet, batch_ids: np.ndarray,
                device: torch.device, *, pad_to: int = 0) -> PackedBatch:
    """Tensors of a micro-batch: inputs, next-token labels (IGNORE_INDEX on padding and on
    each sequence's last token), positions counted within each sequence, and its segments
    (segment 0 continuing its sequence after ``start`` tokens of earlier chunks).

    Built on the host and moved to the device in one copy (pinned, non-blocking on CUDA),
    segment boundaries included, so no layer moves or reads back anything. ``pad_to`` adds
    a padding segment up to that many tokens (static shapes for a compiled model, equal
    widths for a pipeline): no other segment sees it and the loss ignores it. An empty
    micro-batch (a rank keeping step with its peers) becomes two ignored tokens."""
    total = mb.tokens
    if not mb.segments:
        return _padding_batch(max(2, pad_to), device)
    width = max(total, pad_to)
    cu = [0]
    for seg in mb.segments:
        cu.append(cu[-1] + seg.padded)
    if width > total:
        cu.append(width)
    buf = np.empty(3 * width + len(cu), dtype=np.int64)
    ids, labels, pos = buf[:width], buf[width:2 * width], buf[2 * width:3 * width]
    ids[total:] = 0
    labels[:] = IGNORE_INDEX
    pos[total:] = np.arange(width - total)
    buf[3 * width:] = cu
    at = 0
    for seg in mb.segments:
        x = seqs.seq(int(batch_ids[seg.seq]))
        end = seg.start + seg.length
        ids[at:at + seg.length] = x[seg.start:end]
        ids[at + seg.length:at + seg.padded] = 0
        # The target of a stretch's last token is the next stretch's first token.
        tgt = x[seg.start + 1:end + 1]
        labels[at:at + len(tgt)] = tgt
        pos[at:at + seg.padded] = np.arange(seg.start, seg.start + seg.padded)
        at += seg.padded
    dev = to_device(buf, device)
    return PackedBatch(dev[:width], dev[width:2 * width], dev[2 * width:3 * width],
                       Segments(tuple(cu), prefix=mb.segments[0].start, device=device,
                                cu_q_dev=dev[3 * width:]))


def _padding_batch(tokens: int, device: torch.device) -> PackedBatch:
    buf = np.concatenate([np.zeros(tokens, np.int64), np.full(tokens, IGNORE_INDEX, np.int64),
                          np.arange(tokens, dtype=np.int64), [0, tokens]])
    dev = to_device(buf, device)
    return PackedBatch(dev[:tokens], dev[tokens:2 * tokens], dev[2 * tokens:3 * tokens],
                       Segments((0, tokens), device=device, cu_q_dev=dev[3 * tokens:]))


@dataclass(frozen=True)
class CPShareOf:
    """A context-parallel rank's part in every micro-batch: its rank in the group, the group,
    and how sequences are placed (``autotune.data.context_parallel.Placer``)."""

    placer: Placer
    rank: int
    group: object

    def batch(self, mb: MicroBatch, seqs: SequenceSet, batch_ids: np.ndarray,
              device: torch.device) -> PackedBatch:
        from autotune.train.context_parallel import materialize_share

        share = self.placer(mb)[self.rank]
        if not share.local and not share.sharded:  # fewer whole sequences than ranks
            return _padding_batch(2, device)
        return materialize_share(share, seqs, batch_ids, device, rank=self.rank, cp=self.placer.cp,
                                 group=self.group)


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # this rank's summed cross-entropy, on the device (not read back)
    targets: int  # of the global batch


class StepExecutor:
    """Runs a StepPlan's forward and backward passes on a model; the optimizer is the caller's."""

    def __init__(self, model: Decoder, seqs: SequenceSet, *, device: torch.device,
                 autocast_dtype: torch.dtype | None = None,
                 adaptive: AdaptiveCheckpointing | None = None, pad_to: int = 0,
                 cp: CPShareOf | None = None):
        self.model = model
        self.seqs = seqs
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.adaptive = adaptive
        self.pad_to = pad_to  # static token width for a compiled model; 0: as they come
        self.cp = cp

    def _batch(self, mb: MicroBatch, batch_ids: np.ndarray) -> PackedBatch:
        # The two-token batch of a rank keeping step stays small: one more compiled shape
        # costs less than a full micro-batch of padding.
        if self.cp is not None and mb.segments:
            return self.cp.batch(mb, self.seqs, batch_ids, self.device)
        return materialize(mb, self.seqs, batch_ids, self.device,
                           pad_to=self.pad_to if mb.segments else 0)

    def _checkpointing(self, mb: MicroBatch) -> contextlib.AbstractContextManager:
        """Under adaptive checkpointing: this micro-batch's plan, and its probe."""
        if self.adaptive is None or not mb.segments:
            return contextlib.nullcontext()
        ckpt = self.adaptive.layers_for(mb)
        self.model.checkpoint_layers = ckpt
        return self.adaptive.observe(self.model, mb, ckpt)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def run(self, plan: StepPlan, batch_ids: np.ndarray, *, grad_scale: float | None = None
            ) -> StepOutput:
        """Forward and backward of every unit. ``grad_scale`` multiplies each summed loss;
        by default 1 / (target tokens of the global batch), the token mean. Data-parallel
        callers pass dp / targets, since gradient reduction averages over ranks."""
        targets = int((self.seqs.lengths[batch_ids] - 1).sum())
        scale = 1.0 / targets if grad_scale is None else grad_scale
        # Summed on the device: reading each micro-batch's loss back would hold the host
        # until the device caught up, every micro-batch.
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for unit in plan.units:
            if isinstance(unit, ChunkGroup):
                loss += self._run_group(unit, batch_ids, scale)
            else:
                loss += self._run_micro(unit, batch_ids, scale)
        return StepOutput(loss, targets)

    def sync_pass(self) -> None:
        """A two-token forward and backward whose loss is zero: under data parallelism it
        carries the one gradient reduction of the step after all real micro-batches ran
        without it, so ranks with different numbers of micro-batches reduce exactly once."""
        with self._autocast():
            loss_sum, _ = self.model(_padding_batch(2, self.device))
        (loss_sum * 0.0).backward()

    def _run_micro(self, mb: MicroBatch, batch_ids: np.ndarray, scale: float) -> torch.Tensor:
        batch = self._batch(mb, batch_ids)
        with self._checkpointing(mb), self._autocast():
            loss_sum, _ = self.model(batch)
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def _run_group(self, group: ChunkGroup, batch_ids: np.ndarray, scale: float) -> torch.Tensor:
        """ChunkFlow's state-aware schedule: forward over every chunk in order, writing each
        chunk's keys and values into the sequence's state; only the last ``keep`` chunks
        keep their activations. Backward runs in descending chunk order (recomputing dropped
        chunks from the state), so when chunk i is reached every later chunk has already
        added its gradient w.r.t. i's keys and values."""
        if self.adaptive is not None:
            # one plan for the whole group, sized by its widest chunk (the probe hook does
            # not follow chunks through the reversed backward, so groups are never probes)
            widest = max(group.chunks, key=lambda c: c.tokens)
            self.model.checkpoint_layers = self.adaptive.layers_for(widest, probe=False)
        n = len(group.chunks)
        first_kept = n - group.keep
        state = _ChunkState([c.segments[0].length for c in group.chunks])
        kept: dict[int, tuple[torch.Tensor, list[KV], list[KV] | None]] = {}
        for j, chunk in enumerate(group.chunks):
            with_grad = j >= first_kept
            batch = self._batch(chunk, batch_ids)
            prefix = state.prefix(j, leaves=with_grad)
            with torch.set_grad_enabled(with_grad), self._autocast():
                loss_sum, kv = self.model(batch, prefix_kv=prefix, return_kv=True)
            if j < n - 1:  # the last chunk's keys are nobody's prefix
                state.write(j, kv)
            if with_grad:
                kept[j] = (loss_sum, kv, prefix)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for j in reversed(range(n)):
            if j in kept:
                loss_sum, kv, prefix = kept.pop(j)
            else:
                batch = self._batch(group.chunks[j], batch_ids)
                prefix = state.prefix(j, leaves=True)
                with self._autocast():
                    loss_sum, kv = self.model(batch, prefix_kv=prefix, return_kv=True)
            outs, grads = [loss_sum * scale], [torch.ones_like(loss_sum)]
            if j < n - 1:
                for (k, v), (gk, gv) in zip(kv, state.grads_of(j)):
                    outs += [k, v]
                    grads += [gk, gv]
            state.route_prefix_grads(prefix)
            torch.autograd.backward(outs, grads)
            total += loss_sum.detach()
        return total


class _ChunkState:
    """Key/value state of one long sequence, per layer, and its gradient.

    One buffer per layer holds the keys (and one the values) of every chunk; the prefix of
    chunk j is a view of its first P_j rows, never a copy, and gradients w.r.t. a prefix
    accumulate in place into the matching rows of the gradient buffer. Peak memory is then
    the state and its gradient (2 x tokens x kv_width x layers) on top of one chunk's
    activations.
    """

    def __init__(self, lengths: list[int]):
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.gk: list[torch.Tensor] = []
        self.gv: list[torch.Tensor] = []

    def write(self, j: int, kv: list[KV]) -> None:
        if not self.k:
            rows = self.starts[-1]
            self.k = [k.new_empty((rows, *k.shape[1:])) for k, _ in kv]
            self.v = [v.new_empty((rows, *v.shape[1:])) for _, v in kv]
        lo, hi = self.starts[j], self.starts[j + 1]
        with torch.no_grad():
            for layer, (k, v) in enumerate(kv):
                self.k[layer][lo:hi].copy_(k)
                self.v[layer][lo:hi].copy_(v)

    def prefix(self, j: int, *, leaves: bool) -> list[KV] | None:
        """State of chunks 0..j-1 per layer; as fresh leaves (views) when its gradient is
        wanted, so that backward of chunk j deposits dL_j/dK_i for every i < j."""
        if j == 0:
            return None
        p = self.starts[j]
        out = []
        for k, v in zip(self.k, self.v):
            k, v = k[:p].detach(), v[:p].detach()
            if leaves:
                k.requires_grad_()
                v.requires_grad_()
            out.append((k, v))
        return out

    def _grad_buffers(self) -> None:
        if not self.gk:
            self.gk = [torch.zeros_like(k) for k in self.k]
            self.gv = [torch.zeros_like(v) for v in self.v]

    def grads_of(self, j: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Accumulated dL/dK and dL/dV of chunk j's own keys and values, from later chunks."""
        self._grad_buffers()
        lo, hi = self.starts[j], self.starts[j + 1]
        return [(gk[lo:hi], gv[lo:hi]) for gk, gv in zip(self.gk, self.gv)]

    def route_prefix_grads(self, prefix: list[KV] | None) -> None:
        # Autograd adds into an existing .grad in place: pointing it at the buffer's rows
        # accumulates every later chunk's contribution without a temporary per chunk.
        if prefix is None:
            return
        self._grad_buffers()
        p = prefix[0][0].shape[0]
        for (k, v), gk, gv in zip(prefix, self.gk, self.gv):
            k.grad, v.grad = gk[:p], gv[:p]
