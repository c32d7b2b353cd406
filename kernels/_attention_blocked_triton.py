"""Triton kernels behind ``varlen_attention_blocked(..., impl="triton")``.

Imported only when that path runs, so ``kernels`` loads without Triton. One program per
(query block, head, segment) in forward and for dq, one per (key block, kv head, segment) for
dk/dv: every program owns the rows it writes, so the backward needs no atomics, at the price
of recomputing the scores twice. Tensors are (tokens, heads, head_dim) with a contiguous last
dimension; the logsumexp and D_i are (heads, tokens) float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]
from triton.runtime.interpreter import InterpretedFunction  # type: ignore[import-untyped]

__all__ = ["backward", "forward"]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter multiplies bfloat16 blocks as their raw uint16 storage. Products of
    # bfloat16 values are exact in float32, so upcasting first gives what the tensor cores do.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, CU_Q, CU_K, sm_scale, stride_qt, stride_qh, stride_kt, stride_kh,
              stride_lh, HEAD_DIM, REP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seg = tl.program_id(2)
    q_start = tl.load(CU_Q + seg)
    lq = tl.load(CU_Q + seg + 1) - q_start
    k_start = tl.load(CU_K + seg)
    # The grid covers the longest segment; shorter ones have nothing for this block.
    if pid_m * BLOCK_M >= lq:
        return
    offset = tl.load(CU_K + seg + 1) - k_start - lq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_mask = (rows < lq)[:, None] & (dims < HEAD_DIM)[None, :]
    q_ptrs = (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    q = tl.load(Q + q_ptrs, mask=row_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Bottom-right causal: row i sees keys j <= i + offset; nothing past the block's last row does.
    stop = tl.minimum((pid_m + 1) * BLOCK_M, lq) + offset
    for start_n in range(0, stop, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_ptrs = (k_start + cols)[:, None] * stride_kt + (head // REP) * stride_kh + dims[None, :]
        kv_mask = (cols < stop)[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * sm_scale
        s = tl.where(cols[None, :] <= rows[:, None] + offset, s, float("-inf"))
        # Key 0 is visible to every row, so m_i is finite after the first block.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(OUT + q_ptrs, acc.to(OUT.dtype.element_ty), mask=row_mask)
    tl.store(LSE + head * stride_lh + q_start + rows, m_i + tl.log(l_i), mask=rows < lq)


@triton.jit
def _attn_bwd_delta(OUT, DO, DELTA, n_rows, stride_t, stride_h, stride_dh, HEAD_DIM,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (dims < HEAD_DIM)[None, :]
    ptrs = rows[:, None] * stride_t + head * stride_h + dims[None, :]
    o = tl.load(OUT + ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + head * stride_dh + rows, tl.sum(o * do, 1), mask=rows < n_rows)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, sm_scale, stride_qt, stride_qh,
                   stride_kt, stride_kh, stride_lh, HEAD_DIM, REP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    seg = tl.program_id(2)
    q_start = tl.load(CU_Q + seg)
    lq = tl.load(CU_Q + seg + 1) - q_start
    k_start = tl.load(CU_K + seg)
    lk = tl.load(CU_K + seg + 1) - k_start
    if pid_n * BLOCK_N >= lk:
        return
    offset = lk - lq
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = (dims < HEAD_DIM)[None, :]
    kv_ptrs = (k_start + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
    kv_mask = (cols < lk)[:, None] & dim_ok
    k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Rows before the one that sees this block's first key contribute nothing.
    first = (tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M) * BLOCK_M
    # Summing over the query heads of this kv head here is what makes GQA need no atomics.
    for r in range(REP):
        head = kv_head * REP + r
        for start_m in range(first, lq, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < lq
            q_ptrs = (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :]
            q = tl.load(Q + q_ptrs, mask=row_ok[:, None] & dim_ok, other=0.0)
            do = tl.load(DO + q_ptrs, mask=row_ok[:, None] & dim_ok, other=0.0)
            lse = tl.load(LSE + head * stride_lh + q_start + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + head * stride_lh + q_start + rows, mask=row_ok, other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, UPCAST) * sm_scale
            # Valid rows see only cols < lk, so this also masks the padding keys.
            keep = (cols[None, :] <= rows[:, None] + offset) & row_ok[:, None]
            p = tl.exp(tl.where(keep, s, float("-inf")) - lse[:, None])
            dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
            dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, sm_scale, stride_qt, stride_qh,
                 stride_kt, stride_kh, stride_lh, HEAD_DIM, REP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seg = tl.program_id(2)
    q_start = tl.load(CU_Q + seg)
    lq = tl.load(CU_Q + seg + 1) - q_start
    k_start = tl.load(CU_K + seg)
    if pid_m * BLOCK_M >= lq:
        return
    offset = tl.load(CU_K + seg + 1) - k_start - lq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < lq
    dims = tl.arange(0, BLOCK_D)
    dim_ok = (dims < HEAD_DIM)[None, :]
    q_ptrs = (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    q = tl.load(Q + q_ptrs, mask=row_ok[:, None] & dim_ok, other=0.0)
    do = tl.load(DO + q_ptrs, mask=row_ok[:, None] & dim_ok, other=0.0)
    lse = tl.load(LSE + head * stride_lh + q_start + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + head * stride_lh + q_start + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    stop = tl.minimum((pid_m + 1) * BLOCK_M, lq) + offset
    for start_n in range(0, stop, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_ptrs = (k_start + cols)[:, None] * stride_kt + (head // REP) * stride_kh + dims[None, :]
        kv_mask = (cols < stop)[:, None] & dim_ok
        k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * sm_scale
        keep = (cols[None, :] <= rows[:, None] + offset) & row_ok[:, None]
        p = tl.exp(tl.where(keep, s, float("-inf")) - lse[:, None])
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & dim_ok)


_INTERPRETED = isinstance(_attn_fwd, InterpretedFunction)


def _prepare(q: torch.Tensor, k: torch.Tensor, cu_q: Sequence[int], cu_k: Sequence[int],
             device_cu: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """Launch arguments shared by every kernel of one call. The boundaries go to the
    device once per micro-batch (``device_cu``), not once per call."""
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"impl='triton' needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1 "
                         "set before triton is imported")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"impl='triton' supports float16, bfloat16 and float32, not {q.dtype}")
    heads, dim = q.shape[1:]
    return {
        "cu_q": device_cu[0] if device_cu is not None else
        torch.tensor(cu_q, dtype=torch.int32, device=q.device),
        "cu_k": device_cu[1] if device_cu is not None else
        torch.tensor(cu_k, dtype=torch.int32, device=q.device),
        "max_lq": max((b - a for a, b in zip(cu_q, cu_q[1:])), default=0),
        "max_lk": max((b - a for a, b in zip(cu_k, cu_k[1:])), default=0),
        "consts": {"HEAD_DIM": dim, "REP": heads // k.shape[1],
                   "BLOCK_D": max(16, triton.next_power_of_2(dim)),
                   # Full float32 products for float32 inputs: tf32 would round the operands
                   # to 10 mantissa bits, far outside what callers of a float32 kernel expect.
                   "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
                   "UPCAST": _INTERPRETED and q.dtype == torch.bfloat16},
        "scale": dim ** -0.5,
    }


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: Sequence[int],
            cu_k: Sequence[int], *, block_m: int, block_n: int, num_warps: int, num_stages: int,
            device_cu: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (Tq, H, D) and logsumexp (H, Tq) float32."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    a = _prepare(q, k, cu_q, cu_k, device_cu)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    if a["max_lq"] == 0:
        return out, lse
    grid = (triton.cdiv(a["max_lq"], block_m), q.shape[1], len(cu_q) - 1)
    _attn_fwd[grid](q, k, v, out, lse, a["cu_q"], a["cu_k"], a["scale"], q.stride(0), q.stride(1),
                    k.stride(0), k.stride(1), lse.stride(0), **a["consts"], BLOCK_M=block_m,
                    BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return out, lse


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, cu_q: Sequence[int], cu_k: Sequence[int], *,
             block_m: int, block_n: int, num_warps: int, num_stages: int,
             device_cu: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, grad_out = (t.contiguous() for t in (q, k, v, out, grad_out))
    a = _prepare(q, k, cu_q, cu_k, device_cu)
    heads, groups, segs = q.shape[1], k.shape[1], len(cu_q) - 1
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if a["max_lq"] == 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    launch = {"num_warps": num_warps, "num_stages": num_stages}
    _attn_bwd_delta[(triton.cdiv(q.shape[0], block_m), heads)](
        out, grad_out, delta, q.shape[0], q.stride(0), q.stride(1), delta.stride(0),
        a["consts"]["HEAD_DIM"], BLOCK_M=block_m, BLOCK_D=a["consts"]["BLOCK_D"], **launch)
    common = (a["cu_q"], a["cu_k"], a["scale"], q.stride(0), q.stride(1), k.stride(0), k.stride(1),
              lse.stride(0))
    _attn_bwd_dkdv[(triton.cdiv(a["max_lk"], block_n), groups, segs)](
        q, k, v, grad_out, lse, delta, dk, dv, *common, **a["consts"], BLOCK_M=block_m,
        BLOCK_N=block_n, **launch)
    _attn_bwd_dq[(triton.cdiv(a["max_lq"], block_m), heads, segs)](
        q, k, v, grad_out, lse, delta, dq, *common, **a["consts"], BLOCK_M=block_m,
        BLOCK_N=block_n, **launch)
    return dq, dk, dv
