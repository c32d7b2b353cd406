"""RMSNorm with a hand-written backward, in blocks of rows, on torch (CPU) and Triton.

Autograd through :func:`rms_norm_reference` keeps a float32 copy of ``x`` alive for the
backward; :func:`rms_norm_fused` keeps only ``x``, ``weight`` and one float32 ``rstd`` per row
and recomputes the normalized rows in the backward. Each implementation has its own knobs
(``CPU_SPACE``, ``TRITON_SPACE``); sweep one with :func:`kernels.space.configs`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from kernels.elementwise import rms_norm as rms_norm_reference
from kernels.space import resolve

try:  # impl="torch" needs no Triton: this module imports on a machine without it
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
    from triton.runtime.interpreter import InterpretedFunction  # type: ignore[import-untyped]

    _jit = triton.jit
except ImportError:
    triton = None
    _jit = lambda fn: fn  # the kernels are then never launched

__all__ = ["CPU_SPACE", "TRITON_SPACE", "rms_norm_fused", "rms_norm_reference"]

CPU_SPACE: dict[str, list[int]] = {"block_rows": [64, 256, 1024, 4096]}
# block_h is clamped to the row width rounded up to a power of two (wider blocks would only
# add masked lanes), so the choices at or above that width run one and the same kernel.
TRITON_SPACE: dict[str, list[int]] = {
    "block_h": [256, 1024, 4096], "block_rows": [1, 2, 4, 8], "num_warps": [2, 4, 8],
}
_DEFAULTS = {"torch": {"block_rows": 256}, "triton": {"block_h": 1024, "block_rows": 4, "num_warps": 4}}


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float, *, impl: str = "torch",
                   block_rows: int | None = None, block_h: int | None = None,
                   num_warps: int | None = None) -> torch.Tensor:
    """``rms_norm_reference(x, weight, eps)`` (same rounding of the forward), with statistics
    and ``grad_weight`` accumulated in float32.

    Args:
        x: ``(..., H)``, float32 or bfloat16.
        weight: ``(H,)``.
        impl: ``"torch"`` (knob ``block_rows``, default 256: rows normalized per step) or
            ``"triton"`` (knobs ``block_h``, a power of two: columns per step, looping over
            wider rows; ``block_rows``, a power of two: rows per program; ``num_warps``;
            defaults 1024, 4, 4). A knob of the other implementation is refused.

    Example:
        >>> x, w = torch.randn(5, 8), torch.ones(8)
        >>> torch.allclose(rms_norm_fused(x, w, 1e-6, block_rows=2), rms_norm_reference(x, w, 1e-6))
        True
    """
    knobs = resolve(impl, {"block_rows": block_rows, "block_h": block_h, "num_warps": num_warps},
                    _DEFAULTS)
    _check(x, weight, impl, knobs)
    return _RMSNorm.apply(x, weight, eps, impl, knobs)


def _check(x: torch.Tensor, weight: torch.Tensor, impl: str, knobs: dict[str, int]) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight of shape {tuple(weight.shape)} for rows of {x.shape[-1]}")
    for name, value in knobs.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
        # tl.arange spans a power of two, and a warp count is one too.
        if impl == "triton" and value & (value - 1):
            raise ValueError(f"{name}={value} must be a power of two for impl='triton'")
    if impl != "triton":
        return
    if triton is None:
        raise ValueError("impl='triton' needs Triton installed (pip install triton)")
    if x.device.type != "cuda" and not isinstance(_rms_fwd_kernel, InterpretedFunction):
        raise ValueError(f"impl='triton' needs CUDA tensors (got {x.device}) or TRITON_INTERPRET=1 "
                         "set before kernels.rmsnorm is imported")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str,
                knobs: dict[str, int]) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out, rstd = (_forward_torch if impl == "torch" else _forward_triton)(rows, weight, eps, **knobs)
        ctx.save_for_backward(x, weight, rstd)
        ctx.impl, ctx.knobs = impl, knobs
        return out.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        h = x.shape[-1]
        step = _backward_torch if ctx.impl == "torch" else _backward_triton
        grad_x, grad_w = step(x.reshape(-1, h), weight, rstd, grad.reshape(-1, h), **ctx.knobs)
        return grad_x.reshape(x.shape), grad_w, None, None, None


def _forward_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, *, block_rows: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    for i in range(0, n, block_rows):
        xf = x[i:i + block_rows].float()
        r = torch.rsqrt(xf.pow(2).mean(-1) + eps)
        rstd[i:i + block_rows] = r
        # Rounded to x's dtype before the weight, as the reference does.
        out[i:i + block_rows] = (xf * r[:, None]).to(x.dtype) * weight
    return out, rstd


def _backward_torch(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, grad: torch.Tensor,
                    *, block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x = torch.empty_like(x)
    grad_w = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    w = weight.float()
    for i in range(0, x.shape[0], block_rows):
        r = rstd[i:i + block_rows, None]
        xhat = x[i:i + block_rows].float() * r
        g = grad[i:i + block_rows].float()
        gn = g * w
        # d/dx of x*r(x): r * (gn - xhat * mean(gn * xhat)), since dr/dx = -r^3 x / H.
        grad_x[i:i + block_rows] = r * (gn - xhat * (gn * xhat).mean(-1, keepdim=True))
        grad_w += (g * xhat).sum(0)
    return grad_x, grad_w.to(weight.dtype)


def _forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, *, block_h: int,
                    block_rows: int, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    n, h = x.shape
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_rows),)
    _rms_fwd_kernel[grid](x, weight.contiguous(), out, rstd, n, h, eps,
                          BLOCK_H=min(block_h, triton.next_power_of_2(h)), ROWS=block_rows,
                          num_warps=num_warps)
    return out, rstd


def _backward_triton(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, grad: torch.Tensor,
                     *, block_h: int, block_rows: int, num_warps: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    x, grad = x.contiguous(), grad.contiguous()
    n, h = x.shape
    # A few programs per SM walk the row tiles grid-stride, so the partial grad_weight sums
    # are (programs, H), not (tiles, H), which at one row per tile is a float32 copy of x.
    # Off the GPU (the interpreter) a small count makes the tests walk that loop.
    tiles = triton.cdiv(n, block_rows)
    per_device = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count \
        if x.is_cuda else 4
    programs = min(tiles, per_device)
    grad_x = torch.empty_like(x)
    partial_w = torch.empty(programs, h, dtype=torch.float32, device=x.device)
    coef = torch.empty(n, dtype=torch.float32, device=x.device)
    _rms_bwd_kernel[(programs,)](x, weight.contiguous(), grad, rstd, coef, grad_x, partial_w, n, h,
                                 BLOCK_H=min(block_h, triton.next_power_of_2(h)), ROWS=block_rows,
                                 num_warps=num_warps)
    return grad_x, partial_w.sum(0).to(weight.dtype)


# The kernels compute in float32 throughout: the statistics need it, and Triton's interpreter
# (the CPU test path) computes bfloat16 arithmetic on the raw bit patterns.

@_jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, H, eps,
                    BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    base = rows.to(tl.int64)[:, None] * H  # int32 offsets overflow past 2**31 elements
    sq = tl.zeros([ROWS], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = row_ok[:, None] & (cols < H)[None, :]
        x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    rstd = tl.math.rsqrt(sq / H + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = row_ok[:, None] & (cols < H)[None, :]
        x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
        normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + base + cols[None, :], (normed * w[None, :]).to(y_ptr.dtype.element_ty),
                 mask=mask)


@_jit
def _rms_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, coef_ptr, dx_ptr, dw_ptr, n_rows, H,
                    BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    tiles = tl.cdiv(n_rows, ROWS)
    # Pass 1: each row's rstd * mean(gn * xhat), which grad_x needs before any of its columns.
    for tile in range(pid, tiles, tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        base = rows.to(tl.int64)[:, None] * H
        dot = tl.zeros([ROWS], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = row_ok[:, None] & (cols < H)[None, :]
            x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
            dot += tl.sum(dy * w[None, :] * x, axis=1)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        tl.store(coef_ptr + rows, rstd * rstd * dot / H, mask=row_ok)
    # Pass 2 reads coef written by other threads of this program.
    tl.debug_barrier()
    # Columns outside, tiles inside: the program's grad_weight sum for a column block stays
    # in registers and is written once, to the program's own row of partial sums.
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_H], dtype=tl.float32)
        for tile in range(pid, tiles, tl.num_programs(0)):
            rows = tile * ROWS + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            base = rows.to(tl.int64)[:, None] * H
            mask = row_ok[:, None] & (cols < H)[None, :]
            x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)[:, None]
            coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)[:, None]
            # rstd * (gn - xhat * mean(gn * xhat)), with coef = rstd * mean(gn * xhat).
            dx = rstd * (dy * w[None, :]) - x * rstd * coef
            tl.store(dx_ptr + base + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * x * rstd, axis=0)
        tl.store(dw_ptr + pid * H + cols, dw, mask=cols < H)
