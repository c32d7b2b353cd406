"""Blocked (FlashAttention-2 style) varlen causal attention with block sizes as tuning knobs.

Same semantics as :func:`kernels.attention.varlen_attention_reference`: segments by
``cu_seqlens``, grouped-query heads, causal mask aligned bottom-right when a segment has more
keys than queries. Two paths compute the same thing:

- ``impl="torch"``: per segment, query blocks of ``block_q`` rows walk key blocks of
  ``block_k`` with an online softmax. Only q, k, v, the output and the per-row logsumexp are
  kept for backward; no segment-sized score matrix ever exists, so the block sizes trade
  matmul size against memory per step, which is what makes them worth tuning on a CPU.
- ``impl="triton"``: the same algorithm as Triton kernels (:mod:`kernels._attention_blocked_triton`,
  imported only when asked for), with ``block_q``/``block_k`` as ``BLOCK_M``/``BLOCK_N``.

Example:
    >>> import torch
    >>> q = torch.randn(7, 4, 16, requires_grad=True)
    >>> kv = torch.randn(7, 2, 16)
    >>> out = varlen_attention_blocked(q, kv, kv, [0, 3, 7], [0, 3, 7], block_q=2, block_k=2)
    >>> out.shape
    torch.Size([7, 4, 16])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from kernels.attention import _check

__all__ = ["CPU_SPACE", "TRITON_SPACE", "varlen_attention_blocked"]

# Knob name -> choices. The Triton names are the kernels' constexprs: BLOCK_M is the
# ``block_q`` keyword, BLOCK_N is ``block_k``; num_warps and num_stages keep their names.
CPU_SPACE: dict[str, list[int]] = {"block_q": [32, 64, 128, 256], "block_k": [32, 64, 128, 256]}
TRITON_SPACE: dict[str, list[int]] = {
    "BLOCK_M": [16, 32, 64], "BLOCK_N": [16, 32, 64], "num_warps": [4], "num_stages": [1, 2],
}

_IMPLS = ("torch", "triton")


def varlen_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cu_seqlens_q: Sequence[int], cu_seqlens_k: Sequence[int], *,
                             block_q: int = 64, block_k: int = 64, impl: str = "torch",
                             num_warps: int = 4, num_stages: int = 1,
                             device_cu: tuple[torch.Tensor, torch.Tensor] | None = None
                             ) -> torch.Tensor:
    """Causal attention within segments, computed block by block, differentiable.

    Args:
        q: (Tq, H, D) queries.
        k: (Tk, Hkv, D) keys; ``Hkv`` divides ``H``.
        v: (Tk, Hkv, D) values.
        cu_seqlens_q: segment boundaries of ``q``, from 0 to Tq.
        cu_seqlens_k: segment boundaries of ``k``/``v``; every segment has at least as many
            keys as queries (otherwise its first queries would see no key at all).
        block_q: query rows per block (``BLOCK_M`` for Triton).
        block_k: key rows per block (``BLOCK_N`` for Triton).
        impl: ``"torch"`` (any device) or ``"triton"`` (CUDA, or CPU under TRITON_INTERPRET=1).
        num_warps: Triton launch option; ignored by ``"torch"``.
        num_stages: Triton launch option; ignored by ``"torch"``.
        device_cu: ``cu_seqlens_q`` and ``cu_seqlens_k`` already on the device as int32
            (``kernels.attention.Segments.device_cu``), so that the Triton path does not
            copy them to the device on every call; built here when None.

    Returns:
        (Tq, H, D) attention output in ``q``'s dtype.
    """
    cu_q, cu_k = tuple(int(c) for c in cu_seqlens_q), tuple(int(c) for c in cu_seqlens_k)
    _check(q, k, cu_q, cu_k)
    _validate(q, k, v, cu_q, cu_k, block_q, block_k, impl)
    return _BlockedAttention.apply(q, k, v, cu_q, cu_k,
                                   (impl, block_q, block_k, num_warps, num_stages, device_cu))


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: tuple[int, ...],
              cu_k: tuple[int, ...], block_q: int, block_k: int, impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose from {list(_IMPLS)}")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match, with q's head dim "
                         f"{q.shape[-1]}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, int) or b < 1:
            raise ValueError(f"{name}={b!r} is not a positive int")
        # tl.arange needs powers of two and tl.dot at least 16 rows and columns.
        if impl == "triton" and (b < 16 or b & (b - 1)):
            raise ValueError(f"{name}={b} must be a power of two >= 16 for impl='triton'")
    for i in range(len(cu_q) - 1):
        lq, lk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        if lk < lq:
            raise ValueError(f"segment {i} has {lq} queries but only {lk} keys: with bottom-right "
                             "alignment its first queries would see no key")


class _BlockedAttention(torch.autograd.Function):
    """Saves q, k, v, the output and the logsumexp; backward recomputes the scores."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, knobs):  # noqa: ANN001
        impl, block_q, block_k, num_warps, num_stages, device_cu = knobs
        if impl == "triton":
            from kernels import _attention_blocked_triton as tri

            out, lse = tri.forward(q, k, v, cu_q, cu_k, block_m=block_q, block_n=block_k,
                                   num_warps=num_warps, num_stages=num_stages,
                                   device_cu=device_cu)
        else:
            out, lse = _torch_forward(q, k, v, cu_q, cu_k, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cu, ctx.knobs = (cu_q, cu_k), knobs
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        q, k, v, out, lse = ctx.saved_tensors
        impl, block_q, block_k, num_warps, num_stages, device_cu = ctx.knobs
        if impl == "triton":
            from kernels import _attention_blocked_triton as tri

            grads = tri.backward(grad_out, q, k, v, out, lse, *ctx.cu, block_m=block_q,
                                 block_n=block_k, num_warps=num_warps, num_stages=num_stages,
                                 device_cu=device_cu)
        else:
            grads = _torch_backward(grad_out, q, k, v, out, lse, *ctx.cu, block_q, block_k)
        return (*grads, None, None, None)


def _segments(cu_q: Sequence[int], cu_k: Sequence[int]) -> Iterator[tuple[int, int, int, int]]:
    """(query start, query length, key start, key length) of every non-empty segment."""
    for i in range(len(cu_q) - 1):
        if cu_q[i + 1] > cu_q[i]:
            yield cu_q[i], cu_q[i + 1] - cu_q[i], cu_k[i], cu_k[i + 1] - cu_k[i]


def _key_blocks(i0: int, i1: int, offset: int, block_k: int, device: torch.device
                ) -> Iterator[tuple[int, int, torch.Tensor | None]]:
    """Key blocks that query rows [i0, i1) can see, each with its causal mask, or None where
    every row sees every key of the block. Row i sees keys j <= i + offset, so nothing at or
    past i1 + offset is visible to the block and those keys are never touched."""
    stop = i1 + offset
    for j0 in range(0, stop, block_k):
        j1 = min(j0 + block_k, stop)
        mask = None
        if j1 - 1 > i0 + offset:
            rows = torch.arange(i0, i1, device=device).unsqueeze(1)
            mask = torch.arange(j0, j1, device=device) <= rows + offset
        yield j0, j1, mask


def _heads_by_group(x: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """(L, H, D) -> (Hkv, rep, L, D): the query heads that share a kv head side by side, so
    one batched matmul per kv head serves all of them and sums their dk/dv for free."""
    length, heads, dim = x.shape
    return x.to(dtype).permute(1, 0, 2).reshape(groups, heads // groups, length, dim)


def _torch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: Sequence[int],
                   cu_k: Sequence[int], block_q: int, block_k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    acc = torch.promote_types(q.dtype, torch.float32)
    heads, dim = q.shape[1:]
    groups = k.shape[1]
    scale = 1.0 / math.sqrt(dim)
    out = torch.empty_like(q)
    lse = torch.empty(heads, q.shape[0], dtype=acc, device=q.device)
    for q0, lq, k0, lk in _segments(cu_q, cu_k):
        qs = _heads_by_group(q[q0:q0 + lq], groups, acc)
        ks = k[k0:k0 + lk].to(acc).transpose(0, 1)
        vs = v[k0:k0 + lk].to(acc).transpose(0, 1)
        for i0 in range(0, lq, block_q):
            i1 = min(i0 + block_q, lq)
            o, m = _forward_block(qs[:, :, i0:i1], ks, vs, i0, i1, lk - lq, block_k, scale)
            out[q0 + i0:q0 + i1] = o.reshape(heads, i1 - i0, dim).transpose(0, 1).to(q.dtype)
            lse[:, q0 + i0:q0 + i1] = m.reshape(heads, i1 - i0)
    return out, lse


def _forward_block(qb: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, i0: int, i1: int,
                   offset: int, block_k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax of one query block (Hkv, rep, bq, D) over its visible key blocks:
    returns the normalized output and the row logsumexp."""
    groups, rep, bq, dim = qb.shape
    qf = qb.reshape(groups, rep * bq, dim)
    m = torch.full((groups, rep * bq), float("-inf"), dtype=qf.dtype, device=qf.device)
    denom = torch.zeros_like(m)
    acc = torch.zeros_like(qf)
    for j0, j1, mask in _key_blocks(i0, i1, offset, block_k, qf.device):
        s = (qf @ ks[:, j0:j1].transpose(1, 2)) * scale
        if mask is not None:
            s = s.view(groups, rep, bq, j1 - j0).masked_fill(~mask, float("-inf")).view_as(s)
        # Key 0 is visible to every row (offset >= 0), so m is finite after the first block
        # and exp(m - m_new) never sees inf - inf.
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp(s - m_new.unsqueeze(-1))
        alpha = torch.exp(m - m_new)
        denom = denom * alpha + p.sum(-1)
        acc = acc * alpha.unsqueeze(-1) + p @ vs[:, j0:j1]
        m = m_new
    return acc / denom.unsqueeze(-1), m + denom.log()


def _torch_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, cu_q: Sequence[int], cu_k: Sequence[int],
                    block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = lse.dtype
    heads, dim = q.shape[1:]
    groups = k.shape[1]
    scale = 1.0 / math.sqrt(dim)
    # D_i = rowsum(dO * O) equals rowsum(P * dP): the softmax Jacobian's correction term,
    # without ever forming P for a whole row.
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1).transpose(0, 1)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0, lq, k0, lk in _segments(cu_q, cu_k):
        qs = _heads_by_group(q[q0:q0 + lq], groups, acc)
        dos = _heads_by_group(grad_out[q0:q0 + lq], groups, acc)
        ks = k[k0:k0 + lk].to(acc).transpose(0, 1)
        vs = v[k0:k0 + lk].to(acc).transpose(0, 1)
        stats = (lse[:, q0:q0 + lq].reshape(groups, -1, lq), delta[:, q0:q0 + lq].reshape(groups, -1, lq))
        dks, dvs = torch.zeros_like(ks), torch.zeros_like(vs)
        for i0 in range(0, lq, block_q):
            i1 = min(i0 + block_q, lq)
            block = (qs[:, :, i0:i1], dos[:, :, i0:i1], stats[0][:, :, i0:i1], stats[1][:, :, i0:i1])
            dqb = _backward_block(*block, ks, vs, dks, dvs, i0, i1, lk - lq, block_k, scale)
            dq[q0 + i0:q0 + i1] = dqb.reshape(heads, i1 - i0, dim).transpose(0, 1).to(q.dtype)
        dk[k0:k0 + lk] = (dks * scale).transpose(0, 1).to(k.dtype)
        dv[k0:k0 + lk] = dvs.transpose(0, 1).to(v.dtype)
    return dq, dk, dv


def _backward_block(qb: torch.Tensor, dob: torch.Tensor, lse_b: torch.Tensor, delta_b: torch.Tensor,
                    ks: torch.Tensor, vs: torch.Tensor, dks: torch.Tensor, dvs: torch.Tensor,
                    i0: int, i1: int, offset: int, block_k: int, scale: float) -> torch.Tensor:
    """One query block's pass over its visible key blocks: accumulates into the segment's
    dk (unscaled) and dv in place, returns the block's dq."""
    groups, rep, bq, dim = qb.shape
    qf, dof = qb.reshape(groups, rep * bq, dim), dob.reshape(groups, rep * bq, dim)
    lse_f, delta_f = lse_b.reshape(groups, rep * bq, 1), delta_b.reshape(groups, rep * bq, 1)
    dq = torch.zeros_like(qf)
    for j0, j1, mask in _key_blocks(i0, i1, offset, block_k, qf.device):
        kb, vb = ks[:, j0:j1], vs[:, j0:j1]
        s = (qf @ kb.transpose(1, 2)) * scale
        if mask is not None:
            s = s.view(groups, rep, bq, j1 - j0).masked_fill(~mask, float("-inf")).view_as(s)
        p = torch.exp(s - lse_f)
        # Rows are (rep, bq) flattened, so these matmuls sum over the heads sharing a kv head.
        dvs[:, j0:j1] += p.transpose(1, 2) @ dof
        ds = p * (dof @ vb.transpose(1, 2) - delta_f)
        dq += ds @ kb
        dks[:, j0:j1] += ds.transpose(1, 2) @ qf
    return dq * scale
