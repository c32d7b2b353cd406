"""A Llama-style decoder over packed variable-length micro-batches.

RMSNorm, rotary positions, SwiGLU and grouped-query attention, with module names as in
torchtitan (``attention.wq``, ``feed_forward.w1``, ...) so that parallelism plans written for
them apply. Tokens of a micro-batch lie end to end in one dimension; its ``Segments``
(``kernels.attention``) mark where attention may look, built once per micro-batch and shared
by every layer, and positions come from the caller (restarting at 0 for every sequence,
continuing across the chunks of a long one).

Each block's attention runs outside ``torch.compile`` (``compile: blocks`` compiles what is
around it): the kernels are opaque either way, and a micro-batch's segment layout then never
becomes a guard that recompiles the block.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from autotune.config import ModelDims
from kernels.attention import Segments, attention
from kernels.elementwise import apply_rope, rms_norm, swiglu

__all__ = ["Decoder", "LayerAttention", "PackedBatch", "IGNORE_INDEX",
           "keep_attention_out_of_graph"]

IGNORE_INDEX = -100
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PackedBatch:
    """One micro-batch: ``input_ids``, ``labels`` and ``positions`` of shape (tokens,), and
    its segments (segment 0 continuing ``segments.prefix`` tokens of earlier chunks)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    segments: Segments
    cp: Any = None  # a context-parallel rank's layout (autotune.train.context_parallel.CPLayout)

    @property
    def cu_seqlens(self) -> tuple[int, ...]:
        return self.segments.cu_q


@dataclass(eq=False)
class LayerAttention:
    """What one layer's attention needs besides q, k and v: the micro-batch's segments and
    this layer's key/value prefix. An object, not tensors, so that a compiled block passes it
    through to the attention kernel without guarding on (and recompiling for) its contents."""

    segments: Segments
    prefix: KV | None = None
    cp: Any = None  # context parallelism's layout, where the micro-batch is sharded


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, at: LayerAttention,
            impl: str) -> torch.Tensor:
    # Profiler scopes name cost families for profilers/trace.py. Unprofiled, one costs
    # about 10 us: under a millisecond per step of the default workload.
    with record_function("autotune:attention"):
        if at.cp is not None:
            from autotune.train.context_parallel import cp_attention

            return cp_attention(q, k, v, at.cp, impl)
        return attention(q, k, v, at.segments, impl=impl, prefix_kv=at.prefix)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _shard_of(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` as ``p`` (a DTensor, or a plain tensor) holds it: sliced
    locally, since every rank drew the same ``full``."""
    if not hasattr(p, "placements"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    fused = False  # set on every norm of a model whose RunConfig asks kernels.norm: fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from kernels import tuned
            from kernels.rmsnorm import rms_norm_fused

            rows = x.numel() // x.shape[-1]
            cfg = tuned.config("rmsnorm", {"tokens": rows, "width": x.shape[-1]})
            return rms_norm_fused(x, self.weight, self.eps, **cfg)
        return rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        d = self.head_dim
        return (1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float()

    def reset_buffers(self) -> None:
        """Recompute the frequencies where the module was built on the meta device."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def angles(self, positions: torch.Tensor) -> KV:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        return freqs.cos().unsqueeze(1), freqs.sin().unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, dims: ModelDims, impl: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.dim_head
        self.impl = impl
        # The kernel call; a compiled block swaps in the same call kept out of its graph
        # (``keep_attention_out_of_graph``), so eager runs never import the compiler.
        self.attend = _attend
        self.wq = nn.Linear(dims.hidden, dims.q_width, bias=dims.qkv_bias)
        self.wk = nn.Linear(dims.hidden, dims.kv_width, bias=dims.qkv_bias)
        self.wv = nn.Linear(dims.hidden, dims.kv_width, bias=dims.qkv_bias)
        self.wo = nn.Linear(dims.q_width, dims.hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: KV, at: LayerAttention
                ) -> tuple[torch.Tensor, KV]:
        t = x.shape[0]
        # Head counts from the weights, so a tensor-parallel shard sees its own heads.
        q = self.wq(x).view(t, -1, self.head_dim)
        k = self.wk(x).view(t, -1, self.head_dim)
        v = self.wv(x).view(t, -1, self.head_dim)
        q, k = Rotary.apply(q, *rope), Rotary.apply(k, *rope)
        o = self.attend(q, k, v, at, self.impl)
        return self.wo(o.reshape(t, -1)), (k, v)


def keep_attention_out_of_graph(attention: Attention) -> None:
    """For ``torch.compile``: the kernels are opaque either way, and traced, a micro-batch's
    segment layout would become a guard that recompiles the block."""
    attention.attend = torch.compiler.disable(_attend)


class FeedForward(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.w1 = nn.Linear(dims.hidden, dims.ffn, bias=False)
        self.w2 = nn.Linear(dims.ffn, dims.hidden, bias=False)
        self.w3 = nn.Linear(dims.hidden, dims.ffn, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    def __init__(self, dims: ModelDims, impl: str):
        super().__init__()
        self.attention_norm = RMSNorm(dims.hidden, dims.norm_eps)
        self.attention = Attention(dims, impl)
        self.ffn_norm = RMSNorm(dims.hidden, dims.norm_eps)
        self.feed_forward = FeedForward(dims)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                at: LayerAttention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's output, and its (post-rotary) keys and values of every token."""
        a, (k, v) = self.attention(self.attention_norm(h), (cos, sin), at)
        h = h + a
        h = h + self.feed_forward(self.ffn_norm(h))
        return h, k, v


class Decoder(nn.Module):
    """``forward`` returns the summed cross-entropy of the labelled tokens and, per layer,
    the (post-rotary) keys and values of segment 0, which ChunkFlow carries to the next chunk.

    Args:
        dims: model dimensions.
        attention: varlen attention implementation (see ``kernels.attention``).
        checkpoint_layers: recompute the activations of this many leading layers in backward.
        seed: initial weights (see ``reset_parameters``).

    Built under ``torch.device("meta")`` it allocates nothing: the trainer builds it so, cuts
    and shards it, then ``to_empty`` on its device and ``reset_parameters`` there.
    """

    def __init__(self, dims: ModelDims, *, attention: str = "sdpa", checkpoint_layers: int = 0,
                 loss: str = "full", norm: str = "torch", seed: int = 0):
        super().__init__()
        self.dims = dims
        self.fused_loss = loss == "fused"
        self.checkpoint_layers = checkpoint_layers
        self.tok_embeddings = nn.Embedding(dims.vocab, dims.hidden)
        # A dict keyed by global layer index (torchtitan's layout), so that a pipeline stage
        # that keeps a slice of the layers keeps their names and checkpointing decisions.
        self.layers = nn.ModuleDict({str(i): Block(dims, attention) for i in range(dims.layers)})
        self.norm = RMSNorm(dims.hidden, dims.norm_eps)
        self.output = nn.Linear(dims.hidden, dims.vocab, bias=False)
        if dims.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = Rotary(dims.dim_head, dims.rope_theta)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.fused = norm == "fused"
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Initial weights that depend on ``seed`` and each parameter's name only, never on
        the layout: every parameter is drawn whole from a generator seeded by (seed, name)
        and each rank keeps its own shard of it (tensor- and data-parallel DTensors
        included), so a pipeline stage, a tensor-parallel shard and a single process start
        from the same numbers, and no rank holds more than one whole parameter at a time."""
        out_std = 0.02 / math.sqrt(2 * self.dims.layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                fill = 1.0 if name.endswith("norm.weight") else 0.0
                _local(p).fill_(fill)
                continue
            std = out_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
            gen = torch.Generator(device=_local(p).device)
            gen.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            full = torch.randn(p.shape, generator=gen, device=_local(p).device,
                               dtype=torch.float32).mul_(std)
            _local(p).copy_(_shard_of(full, p))
        self.rotary.reset_buffers()

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, segments: Segments,
                   prefix_kv: list[KV] | None = None, cp: Any = None
                   ) -> tuple[torch.Tensor, list[KV]]:
        """The transformer blocks this module holds (all, or a pipeline stage's share), and
        per layer the keys and values of segment 0."""
        cos, sin = self.rotary.angles(positions)
        seg0 = segments.cu_q[1]
        kvs: list[KV] = []
        for i, (name, layer) in enumerate(self.layers.items()):
            at = LayerAttention(segments, prefix_kv[i] if prefix_kv is not None else None, cp)
            if int(name) < self.checkpoint_layers and torch.is_grad_enabled():
                h, k, v = checkpoint(layer, h, cos, sin, at, use_reentrant=False)
            else:
                h, k, v = layer(h, cos, sin, at)
            kvs.append((k[:seg0], v[:seg0]))
        return h, kvs

    def loss_sum(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        with record_function("autotune:loss"):
            if self.fused_loss:
                return self._fused_loss(h, labels)
            logits = self.output(h)
            # Cross-entropy in at least float32 even under bf16 autocast.
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")

    def _fused_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The lm head and cross-entropy in token chunks (kernels.linear_ce): the logits
        never exist whole. Under autocast both operands take the autocast dtype, as the
        unfused lm head would; the kernel accumulates in float32 either way."""
        from kernels import tuned
        from kernels.linear_ce import linear_cross_entropy

        w = self.output.weight
        kind = h.device.type
        if torch.is_autocast_enabled(kind):
            dt = torch.get_autocast_dtype(kind)
            h, w = h.to(dt), w.to(dt)
        elif h.dtype != w.dtype:
            h = h.to(w.dtype)
        cfg = tuned.config("linear_ce", {"tokens": h.shape[0], "hidden": h.shape[1],
                                         "vocab": w.shape[0]})
        with torch.autocast(kind, enabled=False):
            return linear_cross_entropy(h, w, labels, ignore_index=IGNORE_INDEX,
                                        reduction="sum", **cfg)

    def forward(self, batch: PackedBatch, *, prefix_kv: list[KV] | None = None,
                return_kv: bool = False) -> tuple[torch.Tensor, list[KV]]:
        """Summed loss, and segment 0's keys and values per layer when ``return_kv``."""
        h = self.tok_embeddings(batch.input_ids)
        h, kvs = self.run_layers(h, batch.positions, batch.segments, prefix_kv, batch.cp)
        return self.loss_sum(h, batch.labels), (kvs if return_kv else [])
