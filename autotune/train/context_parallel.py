"""Context parallelism for packed variable-length micro-batches (the Llama 3 approach).

A rank of a context-parallel group runs its share of a micro-batch
(``autotune.data.context_parallel.place``): whole sequences of its own, laid first, then its
two pieces of every sharded sequence. Every layer all-gathers the sharded tokens' keys and
values across the group (one collective per layer for the whole micro-batch), rebuilds each
sharded sequence's keys and values in order, and attends its query pieces to them under a
causal mask on the tokens' positions in their sequence; its own sequences take the usual
kernel. The all-gather's backward sums each rank's key/value gradients back to their owner
(a reduce-scatter; gloo has none, so an all-reduce and a slice). Positions restart per
sequence, so rotary embeddings see every token where the whole sequence would put it.

Torch's ``context_parallel`` (torch.distributed.tensor.experimental) shards whole-batch SDPA
along the sequence and has no document mask, so packed sequences of different lengths, each
sharded or not, are not what it can express: this module writes the gather and the mask,
and uses SDPA for the attention itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from autotune.data import SequenceSet
from autotune.data.context_parallel import CPShare
from autotune.train.model import IGNORE_INDEX, PackedBatch
from kernels.attention import Segments, to_device

__all__ = ["CPLayout", "cp_attention", "materialize_share"]


@dataclass(eq=False)
class CPLayout:
    """Where a rank's tokens sit: ``local`` whole-sequence tokens first (their segments), then
    ``block`` tokens of sharded pieces, padded to ``width`` (the group's longest block) for
    the all-gather; per sharded sequence, this rank's pieces and the rows of the gathered
    buffer holding the sequence's keys in order."""

    group: object
    cp: int
    local: int
    local_segments: Segments | None
    block: int
    width: int
    # per sharded sequence: this rank's pieces (block rows r0:r1, sequence tokens start:end)
    # and the gathered rows holding the sequence's keys in order
    queries: list[tuple[list[tuple[int, int, int, int]], torch.Tensor]]


class _GatherKV(torch.autograd.Function):
    """All-gather along dim 0 (padded blocks of equal width); backward: the summed gradient
    of this rank's block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: object, cp: int) -> torch.Tensor:  # noqa: ANN001
        ctx.group, ctx.cp = group, cp
        out = torch.empty((cp * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        grad = grad.contiguous()
        width = grad.shape[0] // ctx.cp
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty((width, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None, None
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * width:(rank + 1) * width], None, None


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: CPLayout,
                 impl: str) -> torch.Tensor:
    """Attention of a rank's tokens: its own sequences by ``impl``, its pieces of sharded
    sequences against their whole (gathered) keys and values."""
    from kernels.attention import attention, prefix_causal_attention

    a = layout.local
    outs = []
    if a:
        outs.append(attention(q[:a], k[:a], v[:a], layout.local_segments, impl=impl))
    if layout.queries:
        kv = torch.stack((k[a:], v[a:]), dim=1)  # (block, 2, Hkv, D)
        if layout.width > layout.block:
            kv = F.pad(kv, (0, 0, 0, 0, 0, 0, 0, layout.width - layout.block))
        gathered = _GatherKV.apply(kv, layout.group, layout.cp)  # (cp x width, 2, Hkv, D)
        qs = q[a:]
        for pieces, keys in layout.queries:
            kf, vf = gathered[keys, 0], gathered[keys, 1]  # the whole sequence (L, Hkv, D)
            for r0, r1, start, end in pieces:
                # a piece sees every key before it and its own causally: ChunkFlow's
                # prefix attention, which never materializes the score matrix
                if start == 0:
                    outs.append(attention(qs[r0:r1], kf[:end], vf[:end],
                                          Segments((0, end), device=q.device), impl=impl))
                else:
                    outs.append(prefix_causal_attention(
                        qs[r0:r1], kf[:start], vf[:start], kf[start:end], vf[start:end],
                        impl=impl))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def materialize_share(share: CPShare, seqs: SequenceSet, batch_ids: np.ndarray,
                      device: torch.device, *, rank: int, cp: int, group: object) -> PackedBatch:
    """This rank's tokens of a micro-batch under context parallelism: inputs, next-token
    labels (IGNORE_INDEX on each sequence's last token), positions within each sequence,
    and the layout its attention needs."""
    width = max(1, max(sum(b - a for sh in share.sharded for a, b in sh.held(r, cp))
                       for r in range(cp)))
    ids, labels, pos, cu = [], [], [], [0]
    for seg in share.local:
        x = seqs.seq(int(batch_ids[seg.seq]))
        ids.append(x[:seg.length])
        lab = np.full(seg.length, IGNORE_INDEX, np.int64)
        lab[:seg.length - 1] = x[1:seg.length]
        labels.append(lab)
        pos.append(np.arange(seg.length))
        cu.append(cu[-1] + seg.length)
    local = cu[-1]
    queries = []
    at = 0
    offsets = [0] * cp  # where each owner's pieces of the next sequence start in its block
    for sh in share.sharded:
        x = seqs.seq(int(batch_ids[sh.segment.seq]))
        length = sh.segment.length
        mine, keys = [], np.empty(length, np.int64)
        for r in range(cp):
            off = offsets[r]
            for a, b in sh.held(r, cp):
                keys[a:b] = r * width + off + np.arange(b - a)
                off += b - a
                if r == rank:
                    ids.append(x[a:b])
                    lab = np.full(b - a, IGNORE_INDEX, np.int64)
                    stop = min(b, length - 1)
                    lab[:max(0, stop - a)] = x[a + 1:stop + 1]
                    labels.append(lab)
                    pos.append(np.arange(a, b))
                    mine.append((at, at + b - a, a, b))
                    at += b - a
            offsets[r] = off
        queries.append((mine, keys))
    tokens = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    buf = np.concatenate([tokens, np.concatenate(labels), np.concatenate(pos), np.array(cu)]).astype(np.int64)
    dev = to_device(buf, device)
    n = len(tokens)
    segs = Segments(tuple(cu), device=device, cu_q_dev=dev[3 * n:]) if local else None
    layout = CPLayout(group, cp, local, segs, at, width,
                      [(mine, torch.as_tensor(k, device=device)) for mine, k in queries])
    return PackedBatch(dev[:n], dev[n:2 * n], dev[2 * n:3 * n],
                       segs if segs is not None else Segments((0, 0), device=device), cp=layout)
