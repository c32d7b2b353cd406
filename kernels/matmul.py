"""Tiled matmul with float32 accumulation, on torch (CPU) and Triton.

Each implementation has its own knobs (``CPU_SPACE``, ``TRITON_SPACE``); sweep one with
:func:`kernels.space.configs`. On CPU the tile sizes are a real knob: they set how much of
each operand stays in cache between ``torch.mm`` calls and how many calls are made.
"""

from __future__ import annotations

import torch

from kernels.space import resolve

try:  # impl="torch" needs no Triton: this module imports on a machine without it
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
    from triton.runtime.interpreter import InterpretedFunction  # type: ignore[import-untyped]

    _jit = triton.jit
except ImportError:
    triton = None
    _jit = lambda fn: fn  # the kernel is then never launched

__all__ = ["CPU_SPACE", "TRITON_SPACE", "matmul_blocked", "matmul_reference"]

CPU_SPACE: dict[str, list[int]] = {
    "block_m": [64, 128, 256, 512], "block_n": [64, 128, 256, 512], "block_k": [64, 128, 256, 512],
}
TRITON_SPACE: dict[str, list[int]] = {
    "block_m": [32, 64, 128], "block_n": [32, 64, 128], "block_k": [32, 64], "group_m": [8],
    "num_warps": [4, 8], "num_stages": [2, 3, 4],
}
_DEFAULTS = {
    "torch": {"block_m": 256, "block_n": 256, "block_k": 256},
    "triton": {"block_m": 64, "block_n": 64, "block_k": 32, "group_m": 8, "num_warps": 4, "num_stages": 3},
}
_TRITON_POW2 = ("block_m", "block_n", "block_k", "num_warps")


def matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` computed in float32 (float64 stays float64), cast back to the inputs' dtype."""
    acc = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (a.to(acc) @ b.to(acc)).to(torch.promote_types(a.dtype, b.dtype))


def matmul_blocked(a: torch.Tensor, b: torch.Tensor, *, impl: str = "torch", block_m: int | None = None,
                   block_n: int | None = None, block_k: int | None = None, group_m: int | None = None,
                   num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """``a @ b`` for ``a`` of (M, K) and ``b`` of (K, N) of one dtype, one (block_m, block_n)
    output tile at a time, summing block_k slices of K into a float32 accumulator.

    There is no hand-written backward: autograd differentiates ``impl="torch"`` through its
    tile products, and ``impl="triton"`` refuses inputs that require grad.

    Args:
        impl: ``"torch"`` (knobs ``block_m``, ``block_n``, ``block_k``; defaults 256 each) or
            ``"triton"`` (the same three, powers of two >= 16, plus ``group_m``: tile rows
            per group of the launch order, ``num_warps`` and ``num_stages``; defaults 64, 64,
            32, 8, 4, 3). A knob of the other implementation is refused. The Triton kernel
            rounds float32 inputs to TF32 only if ``torch.backends.cuda.matmul.allow_tf32``
            is set, as ``torch.mm`` does.

    Example:
        >>> a, b = torch.randn(5, 7), torch.randn(7, 3)
        >>> torch.allclose(matmul_blocked(a, b, block_m=2, block_n=2, block_k=4), a @ b, atol=1e-6)
        True
    """
    knobs = resolve(impl, {"block_m": block_m, "block_n": block_n, "block_k": block_k, "group_m": group_m,
                           "num_warps": num_warps, "num_stages": num_stages}, _DEFAULTS)
    _check(a, b, impl, knobs)
    return (_matmul_torch if impl == "torch" else _matmul_triton)(a, b, **knobs)


def _check(a: torch.Tensor, b: torch.Tensor, impl: str, knobs: dict[str, int]) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"cannot multiply {tuple(a.shape)} by {tuple(b.shape)}: need (M, K) @ (K, N)")
    if a.dtype != b.dtype:
        raise ValueError(f"operands of dtypes {a.dtype} and {b.dtype}; cast one first")
    for name, value in knobs.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if impl != "triton":
        return
    for name in _TRITON_POW2:
        # tl.arange spans a power of two and tl.dot needs at least 16 along each side.
        if knobs[name] & (knobs[name] - 1) or (name != "num_warps" and knobs[name] < 16):
            raise ValueError(f"{name}={knobs[name]} must be a power of two (>= 16 for a block)")
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        raise ValueError("impl='triton' has no backward; use impl='torch' where gradients are needed")
    if triton is None:
        raise ValueError("impl='triton' needs Triton installed (pip install triton)")
    if a.device.type != "cuda" and not _interpreted():
        raise ValueError(f"impl='triton' needs CUDA tensors (got {a.device}) or TRITON_INTERPRET=1 "
                         "set before kernels.matmul is imported")


def _interpreted() -> bool:
    return isinstance(_matmul_kernel, InterpretedFunction)


def _matmul_torch(a: torch.Tensor, b: torch.Tensor, *, block_m: int, block_n: int, block_k: int
                  ) -> torch.Tensor:
    (m, k), n = a.shape, b.shape[1]
    acc_dtype = torch.promote_types(a.dtype, torch.float32)
    out = a.new_empty(m, n)
    b_acc = b.to(acc_dtype)  # converted once, not once per row panel (a no-op for float32)
    for i in range(0, m, block_m):
        panel = a[i:i + block_m].to(acc_dtype)
        for j in range(0, n, block_n):
            acc = torch.zeros(panel.shape[0], min(block_n, n - j), dtype=acc_dtype, device=a.device)
            for p in range(0, k, block_k):
                acc.addmm_(panel[:, p:p + block_k], b_acc[p:p + block_k, j:j + block_n])
            out[i:i + block_m, j:j + block_n] = acc
    return out


def _matmul_triton(a: torch.Tensor, b: torch.Tensor, *, block_m: int, block_n: int, block_k: int,
                   group_m: int, num_warps: int, num_stages: int) -> torch.Tensor:
    (m, k), n = a.shape, b.shape[1]
    c = a.new_empty(m, n)
    tf32 = a.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _matmul_kernel[grid](
        a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        PRECISION="tf32" if tf32 else "ieee",
        # Triton's interpreter multiplies the bit patterns of bfloat16 operands in tl.dot
        # (triton-lang/triton#11584). bfloat16 products are exact in float32, so the upcast
        # changes nothing but the speed.
        UPCAST=_interpreted() and a.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages)
    return c


@_jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: consecutive programs cover GROUP_M tile rows of one tile column
    # before the next column, so the B tiles they share are still in L2; row-major order
    # would stream all of B once per tile row.
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    # int64 rows and columns: int32 offsets overflow past 2**31 elements of an operand.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = (offs_m < M)[:, None]
    n_ok = (offs_n < N)[None, :]
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # Masked lanes load zeros, which add nothing to the dot product.
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok & n_ok)
