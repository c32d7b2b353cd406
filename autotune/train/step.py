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
from autotune.train.model import IGNORE_INDEX, KV, Decoder, PackedBatch

__all__ = ["StepExecutor", "materialize"]


def materialize(mb: MicroBatch, seqs: SequenceSet, batch_ids: np.ndarray,
                device: torch.device) -> PackedBatch:
    """Tensors of a micro-batch: inputs, next-token labels (IGNORE_INDEX on padding and on
    each sequence's last token) and positions counted within each sequence."""
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


@dataclass
class StepOutput:
    loss_sum: float  # summed cross-entropy over the global batch's targets
    targets: int


class StepExecutor:
    """Runs a StepPlan's forward and backward passes on a model; the optimizer is the caller's."""

    def __init__(self, model: Decoder, seqs: SequenceSet, *, device: torch.device,
                 autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.seqs = seqs
        self.device = device
        self.autocast_dtype = autocast_dtype

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def run(self, plan: StepPlan, batch_ids: np.ndarray) -> StepOutput:
        targets = int((self.seqs.lengths[batch_ids] - 1).sum())
        scale = 1.0 / targets
        loss = torch.zeros((), dtype=torch.float64)
        for unit in plan.units:
            if isinstance(unit, ChunkGroup):
                loss += self._run_group(unit, batch_ids, scale)
            else:
                loss += self._run_micro(unit, batch_ids, scale)
        return StepOutput(float(loss), targets)

    def _run_micro(self, mb: MicroBatch, batch_ids: np.ndarray, scale: float) -> torch.Tensor:
        batch = materialize(mb, self.seqs, batch_ids, self.device)
        with self._autocast():
            loss_sum, _ = self.model(batch)
        (loss_sum * scale).backward()
        return loss_sum.detach().double().cpu()

    @staticmethod
    def _prefix(states: list[list[KV]], j: int, leaves: bool) -> list[KV] | None:
        """Key/value state of chunks 0..j-1 per layer; as fresh leaves when their gradient is
        wanted, so that backward of chunk j deposits dL_j/dK_i there for every i < j."""
        if j == 0:
            return None
        out = []
        for layer in range(len(states[0])):
            k = torch.cat([s[layer][0] for s in states[:j]])
            v = torch.cat([s[layer][1] for s in states[:j]])
            if leaves:
                k.requires_grad_()
                v.requires_grad_()
            out.append((k, v))
        return out

    def _run_group(self, group: ChunkGroup, batch_ids: np.ndarray, scale: float) -> torch.Tensor:
        """ChunkFlow's state-aware schedule: forward over every chunk in order, keeping the
        key/value state; only the last ``keep`` chunks keep their activations. Backward runs
        in descending chunk order (recomputing dropped chunks from the state), so when chunk
        i is reached every later chunk has already added its gradient w.r.t. i's keys and
        values."""
        n = len(group.chunks)
        first_kept = n - group.keep
        batches = [materialize(c, self.seqs, batch_ids, self.device) for c in group.chunks]
        states: list[list[KV]] = []
        kept: dict[int, tuple[torch.Tensor, list[KV], list[KV] | None]] = {}
        for j in range(n):
            with_grad = j >= first_kept
            prefix = self._prefix(states, j, leaves=with_grad)
            with torch.set_grad_enabled(with_grad), self._autocast():
                loss_sum, kv = self.model(batches[j], prefix_kv=prefix)
            states.append([(k.detach(), v.detach()) for k, v in kv])
            if with_grad:
                kept[j] = (loss_sum, kv, prefix)
        kv_grads: list[list[list[torch.Tensor | None]]] = [
            [[None, None] for _ in states[0]] for _ in range(n)]
        total = torch.zeros((), dtype=torch.float64)
        for j in reversed(range(n)):
            if j in kept:
                loss_sum, kv, prefix = kept.pop(j)
            else:
                prefix = self._prefix(states, j, leaves=True)
                with self._autocast():
                    loss_sum, kv = self.model(batches[j], prefix_kv=prefix)
            outs, grads = [loss_sum * scale], [torch.ones((), dtype=loss_sum.dtype)]
            for (k, v), (gk, gv) in zip(kv, kv_grads[j]):
                for t, g in ((k, gk), (v, gv)):
                    if g is not None:
                        outs.append(t)
                        grads.append(g)
            torch.autograd.backward(outs, grads)
            total += loss_sum.detach().double().cpu()
            if prefix is not None:
                self._scatter_prefix_grads(prefix, states, j, kv_grads)
        return total

    @staticmethod
    def _scatter_prefix_grads(prefix: list[KV], states: list[list[KV]], j: int,
                              kv_grads: list[list[list[torch.Tensor | None]]]) -> None:
        sizes = [states[i][0][0].shape[0] for i in range(j)]
        for layer, (k, v) in enumerate(prefix):
            for which, leaf in enumerate((k, v)):
                if leaf.grad is None:
                    continue
                for i, g in enumerate(leaf.grad.split(sizes)):
                    acc = kv_grads[i][layer][which]
                    kv_grads[i][layer][which] = g if acc is None else acc + g
