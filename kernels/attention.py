"""Variable-length causal attention over ``cu_seqlens``.

Segment ``i`` holds queries ``q[cu_q[i]:cu_q[i+1]]`` and keys/values
``k[cu_k[i]:cu_k[i+1]]``; queries never see another segment. When a segment has more keys
than queries (a ChunkFlow chunk attending to the key/value state of earlier chunks), the
causal mask is aligned bottom-right, as in FlashAttention 2.1+: the last query sees every
key. Grouped-query attention: ``q`` has a multiple of ``k``'s heads.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ATTENTION_IMPLS", "prefix_causal_attention", "varlen_attention", "varlen_attention_reference",
]


def _check(q: torch.Tensor, k: torch.Tensor, cu_q: Sequence[int], cu_k: Sequence[int]) -> None:
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q has {len(cu_q)} entries, cu_seqlens_k {len(cu_k)}")
    if cu_q[-1] != q.shape[0] or cu_k[-1] != k.shape[0]:
        raise ValueError("cu_seqlens must end at the number of rows of q and k")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"kv heads {k.shape[1]} do not divide query heads {q.shape[1]}")


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens_q: Sequence[int], cu_seqlens_k: Sequence[int]
                               ) -> torch.Tensor:
    """Plain math, one segment at a time, softmax in at least float32: slow and obviously right."""
    _check(q, k, cu_seqlens_q, cu_seqlens_k)
    rep = q.shape[1] // k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].to(acc).transpose(0, 1)
        ks = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].to(acc).repeat_interleave(rep, 1).transpose(0, 1)
        vs = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].to(acc).repeat_interleave(rep, 1).transpose(0, 1)
        lq, lk = qs.shape[1], ks.shape[1]
        scores = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~mask, float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(out, 0)


def _rows(starts: list[int], length: int, device: torch.device) -> torch.Tensor:
    base = torch.tensor(starts, device=device).unsqueeze(1)
    return (base + torch.arange(length, device=device)).reshape(-1)


def _sdpa_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """q: (b, lq, H, D), k/v: (b, lk, Hkv, D) -> (b, lq, H, D)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if lq == lk:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        # A plain boolean mask rather than torch's CausalBias subclass: the CPU kernel
        # materializes the bias anyway, and a tensor subclass breaks dispatch-mode tools
        # such as the memory tracker.
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return o.transpose(1, 2)


def varlen_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens_q: Sequence[int], cu_seqlens_k: Sequence[int]) -> torch.Tensor:
    """Segments of equal shape are batched into one fused SDPA call each, so a padded
    micro-batch is a single call and a pack costs one call per distinct length."""
    _check(q, k, cu_seqlens_q, cu_seqlens_k)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in range(len(cu_seqlens_q) - 1):
        lq, lk = cu_seqlens_q[i + 1] - cu_seqlens_q[i], cu_seqlens_k[i + 1] - cu_seqlens_k[i]
        groups[(lq, lk)].append(i)
    h, d = q.shape[1:]
    hk = k.shape[1]
    if len(groups) == 1 and cu_seqlens_q == cu_seqlens_k:
        (lq, _), members = next(iter(groups.items()))
        b = len(members)
        return _sdpa_group(q.view(b, lq, h, d), k.view(b, lq, hk, d),
                           v.view(b, lq, hk, d), lq, lq).reshape(-1, h, d)
    outs, rows = [], []
    for (lq, lk), members in groups.items():
        sq = [cu_seqlens_q[i] for i in members]
        sk = [cu_seqlens_k[i] for i in members]
        if len(members) == 1:
            qs, ks, vs = q[sq[0]:sq[0] + lq], k[sk[0]:sk[0] + lk], v[sk[0]:sk[0] + lk]
        else:
            iq, ik = _rows(sq, lq, q.device), _rows(sk, lk, q.device)
            qs, ks, vs = q.index_select(0, iq), k.index_select(0, ik), v.index_select(0, ik)
        b = len(members)
        o = _sdpa_group(qs.view(b, lq, h, d), ks.view(b, lk, hk, d), vs.view(b, lk, hk, d), lq, lk)
        outs.append(o.reshape(-1, h, d))
        rows.append(_rows(sq, lq, q.device))
    order = torch.cat(rows)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(outs, 0).index_select(0, inverse)


def _varlen_attention_tuned(impl: str):  # noqa: ANN202
    """The blocked kernel with the block sizes tuned for this micro-batch's shape."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Sequence[int],
            cu_seqlens_k: Sequence[int]) -> torch.Tensor:
        from kernels import tuned
        from kernels.attention_blocked import varlen_attention_blocked

        longest = max(b - a for a, b in zip(cu_seqlens_k[:-1], cu_seqlens_k[1:], strict=True))
        cfg = tuned.config("attention", {"tokens": k.shape[0], "max_len": longest,
                                         "heads": q.shape[1], "kv_heads": k.shape[1],
                                         "head_dim": q.shape[2]})
        return varlen_attention_blocked(q, k, v, cu_seqlens_q, cu_seqlens_k, impl=impl, **cfg)

    return run


ATTENTION_IMPLS = {"sdpa": varlen_attention_sdpa, "eager": varlen_attention_reference,
                   "blocked": _varlen_attention_tuned("torch"),
                   "triton": _varlen_attention_tuned("triton")}


def _lower_right_bias(lq: int, lk: int, like: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(lq, lk, dtype=torch.bool, device=like.device).tril(diagonal=lk - lq)
    return torch.zeros(lq, lk, dtype=like.dtype, device=like.device).masked_fill_(~keep, float("-inf"))


def _heads_first(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(0, 1).unsqueeze(0) for t in ts]


class _PrefixAttentionCPU(torch.autograd.Function):
    """One segment attending to a key/value prefix plus its own keys, bottom-right causal,
    on the CPU flash kernel.

    What autograd would keep by default is the concatenated keys and values and the float
    mask, per layer: all of them grow with the prefix, i.e. with the longest sequence, which
    is exactly what ChunkFlow must not do. This keeps only the prefix tensors themselves (the
    caller's key/value state, not copies) and rebuilds the concatenation and the mask in
    backward. The prefix is stashed without a version check: ChunkFlow writes each stretch
    of its state once, before any chunk reads it, and never changes it afterwards.
    """

    _fwd = staticmethod(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    _bwd = staticmethod(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)

    @staticmethod
    def forward(ctx, q, k_prefix, v_prefix, k, v):  # noqa: ANN001
        kb, vb = torch.cat((k_prefix, k)), torch.cat((v_prefix, v))
        bias = _lower_right_bias(q.shape[0], kb.shape[0], q)
        qh, kh, vh = _heads_first(q, kb, vb)
        out, lse = _PrefixAttentionCPU._fwd(qh, kh, vh, 0.0, False, attn_mask=bias)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.prefix = (k_prefix, v_prefix)
        return out.squeeze(0).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        q, k, v, out, lse = ctx.saved_tensors
        k_prefix, v_prefix = ctx.prefix
        kb, vb = torch.cat((k_prefix, k)), torch.cat((v_prefix, v))
        bias = _lower_right_bias(q.shape[0], kb.shape[0], q)
        qh, kh, vh, gh = _heads_first(q, kb, vb, grad_out.contiguous())
        gq, gk, gv = _PrefixAttentionCPU._bwd(gh.contiguous(), qh, kh, vh, out, lse, 0.0, False,
                                              attn_mask=bias)
        gq, gk, gv = (g.squeeze(0).transpose(0, 1) for g in (gq, gk, gv))
        p = k_prefix.shape[0]
        return gq, gk[:p], gv[:p], gk[p:], gv[p:]


def prefix_causal_attention(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                            k: torch.Tensor, v: torch.Tensor, *, impl: str = "sdpa"
                            ) -> torch.Tensor:
    """Attention of one segment's queries over a key/value prefix (earlier chunks of the same
    sequence, all visible) followed by the segment's own keys (causal): bottom-right
    alignment. Shapes: q (L, H, D); k, v (L, Hkv, D); prefixes (P, Hkv, D)."""
    if impl == "sdpa" and q.device.type == "cpu" and q.dtype == k_prefix.dtype:
        return _PrefixAttentionCPU.apply(q, k_prefix, v_prefix, k, v)
    kb, vb = torch.cat((k_prefix, k)), torch.cat((v_prefix, v))
    return varlen_attention(q, kb, vb, (0, q.shape[0]), (0, kb.shape[0]), impl=impl)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: Sequence[int], cu_seqlens_k: Sequence[int], *,
                     impl: str = "sdpa") -> torch.Tensor:
    """Causal attention within segments; see the module docstring for the layout."""
    try:
        fn = ATTENTION_IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; "
                         f"choose from {sorted(ATTENTION_IMPLS)}") from None
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k)
