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
from autotune.train.adaptive import AdaptiveCheckpointing
from autotune.train.model import IGNORE_INDEX, KV, Decoder, PackedBatch

__all__ = ["StepExecutor", "materialize"]


def materialize(mb: MicroBatch, seqs: SequenceSet, batch_ids: np.ndarray,
                device: torch.device) -> PackedBatch:
    """Tensors of a micro-batch: inputs, next-token labels (IGNORE_INDEX on padding and on
    each sequence's last token) and positions counted within each sequence. An empty
    micro-batch (a rank keeping step with its peers) becomes two ignored tokens."""
    if not mb.segments:
        return _empty_batch(device)
    total = mb.tokens
    ids = np.zeros(total, dtype=np.int64)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    pos = np.empty(total, dtype=np.int64)
    cu = [0]
    at = 0
    for seg in mb.segments:
        x = seqs.seq(int(batch_ids[seg.seq]))
        end = seg.start + seg.length
        ids[at:at + seg.length] = x[seg.start:end]
        # The target of a stretch's last token is the next stretch's first token.
        tgt = x[seg.start + 1:end + 1]
        labels[at:at + len(tgt)] = tgt
        pos[at:at + seg.padded] = np.arange(seg.start, seg.start + seg.padded)
        at += seg.padded
        cu.append(at)
    as_t = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    return PackedBatch(as_t(ids), as_t(labels), as_t(pos), tuple(cu))


def _empty_batch(device: torch.device) -> PackedBatch:
    zeros = torch.zeros(2, dtype=torch.long, device=device)
    return PackedBatch(zeros, torch.full_like(zeros, IGNORE_INDEX), torch.arange(2, device=device),
                       (0, 2))


@dataclass
class StepOutput:
    loss_sum: float  # summed cross-entropy over the global batch's targets
    targets: int


class StepExecutor:
    """Runs a StepPlan's forward and backward passes on a model; the optimizer is the caller's."""

    def __init__(self, model: Decoder, seqs: SequenceSet, *, device: torch.device,
                 autocast_dtype: torch.dtype | None = None,
                 adaptive: AdaptiveCheckpointing | None = None):
        self.model = model
        self.seqs = seqs
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.adaptive = adaptive

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
        loss = torch.zeros((), dtype=torch.float64)
        for unit in plan.units:
            if isinstance(unit, ChunkGroup):
                loss += self._run_group(unit, batch_ids, scale)
            else:
                loss += self._run_micro(unit, batch_ids, scale)
        return StepOutput(float(loss), targets)

    def sync_pass(self) -> None:
        """A two-token forward and backward whose loss is zero: under data parallelism it
        carries the one gradient reduction of the step after all real micro-batches ran
        without it, so ranks with different numbers of micro-batches reduce exactly once."""
        with self._autocast():
            loss_sum, _ = self.model(_empty_batch(self.device))
        (loss_sum * 0.0).backward()

    def _run_micro(self, mb: MicroBatch, batch_ids: np.ndarray, scale: float) -> torch.Tensor:
        batch = materialize(mb, self.seqs, batch_ids, self.device)
        with self._checkpointing(mb), self._autocast():
            loss_sum, _ = self.model(batch)
        (loss_sum * scale).backward()
        return loss_sum.detach().double().cpu()

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
            batch = materialize(chunk, self.seqs, batch_ids, self.device)
            prefix = state.prefix(j, leaves=with_grad)
            with torch.set_grad_enabled(with_grad), self._autocast():
                loss_sum, kv = self.model(batch, prefix_kv=prefix, return_kv=True)
            if j < n - 1:  # the last chunk's keys are nobody's prefix
                state.write(j, kv)
            if with_grad:
                kept[j] = (loss_sum, kv, prefix)
        total = torch.zeros((), dtype=torch.float64)
        for j in reversed(range(n)):
            if j in kept:
                loss_sum, kv, prefix = kept.pop(j)
            else:
                batch = materialize(group.chunks[j], self.seqs, batch_ids, self.device)
                prefix = state.prefix(j, leaves=True)
                with self._autocast():
                    loss_sum, kv = self.model(batch, prefix_kv=prefix, return_kv=True)
            outs, grads = [loss_sum * scale], [torch.ones((), dtype=loss_sum.dtype)]
            if j < n - 1:
                for (k, v), (gk, gv) in zip(kv, state.grads_of(j)):
                    outs += [k, v]
                    grads += [gk, gv]
            state.route_prefix_grads(prefix)
            torch.autograd.backward(outs, grads)
            total += loss_sum.detach().double().cpu()
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
