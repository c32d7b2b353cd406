"""The GPU attention kernels as operators torch's tracing tools can see through.

``autotune::varlen_attn`` is FlashAttention varlen (the kernels behind
``torch.nn.attention.varlen``) as a ``torch.library`` custom op with its own autograd: it
takes ChunkFlow's key/value prefix as separate inputs, so that autograd keeps q, k, v, the
output and the logsumexp, exactly what the kernel needs for backward, and never the
concatenation of prefix and keys (which grows with the longest sequence, per layer). Its
fake implementation gives the same outputs by shape, so that a model runs under
``FakeTensorMode`` and memory tools count exactly what the GPU would hold.

FlexAttention needs no wrapper: it is a higher-order op with its own fake and autograd,
which keep q, k, v, the output and the logsumexp. It is compiled once per process.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["flex_attention_compiled", "varlen_attn"]

_CAUSAL = [-1, 0]  # FlashAttention's window for causal attention, aligned bottom-right


def _keys(k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor | None,
          v_prefix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if k_prefix is None or v_prefix is None:
        return k, v
    return torch.cat((k_prefix, k)), torch.cat((v_prefix, v))


def _needs_cuda(q: torch.Tensor) -> None:
    if q.device.type != "cuda":
        raise RuntimeError(f"kernels.attention 'varlen' is FlashAttention, which runs on CUDA only "
                           f"(got {q.device}); use sdpa or blocked on this device")


@torch.library.custom_op("autotune::varlen_attn", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor | None,
             v_prefix: torch.Tensor | None, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
             max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    _needs_cuda(q)
    import torch.nn.attention.varlen  # noqa: F401 - registers torch_attn::_varlen_attn

    kb, vb = _keys(k, v, k_prefix, v_prefix)
    out, lse, _ = torch.ops.torch_attn._varlen_attn(
        q, kb, vb, cu_q, cu_k, max_q, max_k, True, None, _CAUSAL, True, None, None, None)
    return out, lse


@_forward.register_fake
def _forward_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None,
                  cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    # FlashAttention's varlen outputs: o like q, and a float32 logsumexp of (heads, tokens).
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("autotune::varlen_attn_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None,
                 out: torch.Tensor, lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    _needs_cuda(q)
    import torch.nn.attention.varlen  # noqa: F401

    kb, vb = _keys(k, v, k_prefix, v_prefix)
    rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout
    dq, dkb, dvb = torch.ops.torch_attn._varlen_attn_backward(
        grad_out.contiguous(), q, kb, vb, out, lse, cu_q, cu_k, max_q, max_k, True, rng, None,
        _CAUSAL)
    p = 0 if k_prefix is None else k_prefix.shape[0]
    return dq, dkb[p:], dvb[p:], dkb[:p], dvb[:p]


@_backward_op.register_fake
def _backward_fake(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None,
                   out: torch.Tensor, lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   max_q: int, max_k: int) -> tuple[torch.Tensor, ...]:
    p = 0 if k_prefix is None else k_prefix.shape[0]
    rows = lambda t, n: t.new_empty((n, *t.shape[1:]))  # noqa: E731
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), rows(k, p), rows(v, p))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, k_prefix, v_prefix, cu_q, cu_k, max_q, max_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    # The prefix is ChunkFlow's key/value state: views of a buffer whose later rows are
    # written after this chunk ran (which a saved tensor's version check would refuse),
    # while the rows seen here are written once and never change.
    ctx.prefix = (k_prefix, v_prefix)
    ctx.max_q, ctx.max_k = max_q, max_k


def _backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor) -> tuple:
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    k_prefix, v_prefix = ctx.prefix
    dq, dk, dv, dkp, dvp = torch.ops.autotune.varlen_attn_backward(
        grad_out, q, k, v, k_prefix, v_prefix, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k)
    has_prefix = k_prefix is not None
    return (dq, dk, dv, dkp if has_prefix else None, dvp if has_prefix else None,
            None, None, None, None)


_forward.register_autograd(_backward, setup_context=_setup_context)


def varlen_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_prefix: torch.Tensor | None, v_prefix: torch.Tensor | None,
                cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int) -> torch.Tensor:
    """Causal attention within segments (GQA, bottom-right aligned), segment 0 also seeing
    the prefix; ``cu_q``/``cu_k`` are int32 device tensors, ``cu_k`` counting the prefix."""
    out, _ = torch.ops.autotune.varlen_attn(q, k, v, k_prefix, v_prefix, cu_q, cu_k, max_q, max_k)
    return out


@functools.cache
def flex_attention_compiled(device_type: str) -> Any:
    """``flex_attention`` compiled (uncompiled, it materializes the scores), once per process
    and device type. Shapes vary per micro-batch, so on CUDA they are dynamic from the
    start; on CPU each shape compiles on its own, because torch 2.13's CPU template fails to
    build with dynamic shapes when queries and keys differ in length (a prefix)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=device_type == "cuda")
