"""Fused linear cross-entropy: the lm head and its loss, token chunk by token chunk.

The full logits of an lm head are (tokens, vocab) floats: 1 GiB in float32 at 8K tokens and
a 32K vocabulary, and autograd through ``F.cross_entropy`` keeps several such tensors alive.
Here the tokens go through ``chunk_tokens`` at a time and, as in Liger-Kernel, each chunk's
gradients are computed in the forward itself: ``d_logits = softmax - onehot`` (times the
reduction's scale, zero on ignored rows) straight into ``grad_hidden[chunk] = d_logits @ W``
and ``grad_weight += d_logits.T @ h``. Only ``grad_hidden`` (N, H) and ``grad_weight`` (V, H)
outlive the forward; backward scales them by the incoming gradient. The extra memory is
about ``chunk_tokens x V`` floats instead of several ``N x V``.

Knobs, and what they trade:

* ``chunk_tokens`` (``CPU_SPACE``): tokens per chunk. Peak memory grows with it (one float32
  chunk of logits, plus its input-dtype copy under bf16); small chunks run smaller GEMMs
  and read and write the whole float32 ``grad_weight`` accumulator once per chunk.
* ``BLOCK_V`` (``TRITON_SPACE``, ``impl="triton"``): vocabulary columns one program handles
  per step of its loop over a row; a power of two. Large blocks mean fewer steps and more
  registers per thread.
* ``num_warps`` (``TRITON_SPACE``): warps per program, i.e. per row of the chunk.

The Triton kernel only replaces the per-chunk softmax/loss/``d_logits`` step; the GEMMs stay
in torch, where cuBLAS (or the CPU BLAS) is hard to beat. Triton is imported on first use,
so this module imports on a machine without it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CPU_SPACE", "TRITON_SPACE", "linear_cross_entropy", "linear_cross_entropy_reference",
    "workspace_bytes",
]

CPU_SPACE: dict[str, list[int]] = {"chunk_tokens": [256, 512, 1024, 2048, 4096, 8192]}
TRITON_SPACE: dict[str, list[int]] = {"BLOCK_V": [512, 1024, 2048, 4096, 8192],
                                      "num_warps": [4, 8, 16, 32]}

_REDUCTIONS = ("sum", "mean")


def workspace_bytes(tokens: Any, hidden: int, vocab: int, chunk_tokens: int | None = None,
                    itemsize: int = 4) -> Any:
    """Bytes the loss allocates beyond its inputs, by the analytic count; ``chunk_tokens``
    None: full logits (float32 logits, their softmax and their gradient, alive together under
    autograd). Fused: one float32 chunk of logits (plus its input-dtype copy below float32)
    and the gradients of hidden and head. The count the tuner holds a memory cut against;
    within 0.1% of the tracked peaks at vocabulary 32K, 8K tokens (results/linear_ce)."""
    if chunk_tokens is None:
        return 3 * tokens * vocab * 4
    # np.minimum: the step model passes arrays of token counts
    chunk = np.minimum(chunk_tokens, tokens) * vocab * (4 + (itemsize if itemsize < 4 else 0))
    return chunk + (tokens * hidden + vocab * hidden) * 4
_IMPLS = ("torch", "triton")


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                   targets: torch.Tensor, ignore_index: int = -100,
                                   reduction: str = "sum") -> torch.Tensor:
    """Plain math: the full (N, V) logits in at least float32, then ``F.cross_entropy``.

    Example:
        >>> h, w = torch.zeros(2, 4), torch.zeros(3, 4)
        >>> round(linear_cross_entropy_reference(h, w, torch.tensor([0, 2])).item(), 4)
        2.1972
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(acc) @ weight.to(acc).T
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
           reduction: str, impl: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} are not "
                         "(N, H) and (V, H)")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets {tuple(targets.shape)} do not match {hidden.shape[0]} tokens")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets are {targets.dtype}, not torch.int64")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {_REDUCTIONS}")
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {_IMPLS}")


def _softmax_grad_torch(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                        scale: float, grads: bool) -> torch.Tensor:
    """Per-row loss of a float32 chunk; with ``grads``, turns ``logits`` into d_logits in place.

    In place because ``torch.logsumexp`` and ``softmax`` would each allocate another chunk.
    """
    safe = torch.where(valid, targets, 0).unsqueeze(1)
    target_logit = logits.gather(1, safe).squeeze(1)
    row_max = logits.amax(1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    row_sum = exp.sum(1, keepdim=True)
    lse = (row_max + row_sum.log()).squeeze(1)
    # where, not a product: an ignored row's logits may be anything, even inf.
    loss = torch.where(valid, lse - target_logit, 0.0)
    if grads:
        row_scale = valid.to(exp.dtype).unsqueeze(1) * scale
        exp.mul_(row_scale / row_sum).scatter_add_(1, safe, -row_scale)
    return loss


@functools.cache
def _triton_kernel() -> Any:
    """Built on first use: ``TRITON_INTERPRET`` is read when the kernel is decorated."""
    import triton
    import triton.language as tl

    @triton.jit
    def softmax_grad_rows(logits_ptr, stride, targets_ptr, loss_ptr, n_cols, ignore_index, scale,
                          GRADS: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        safe = tl.where(valid, target, 0)
        # Online logsumexp: one read of the row for the statistics, one for d_logits.
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        target_logit = tl.load(row_ptr + safe).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
        if GRADS:
            row_scale = tl.where(valid, scale, 0.0)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < n_cols
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                d = tl.exp(x - lse) - tl.where(cols == safe, 1.0, 0.0)
                tl.store(row_ptr + cols, d * row_scale, mask=mask)

    return softmax_grad_rows


def _softmax_grad_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         scale: float, grads: bool, block_v: int, num_warps: int) -> torch.Tensor:
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _triton_kernel()[(logits.shape[0],)](
        logits, logits.stride(0), targets, loss, logits.shape[1], ignore_index, scale,
        GRADS=grads, BLOCK_V=block_v, num_warps=num_warps)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                opts: dict[str, Any]) -> torch.Tensor:
        n, v = hidden.shape[0], weight.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_h, grad_w = opts["grad_hidden"], opts["grad_weight"]
        valid_all = targets != opts["ignore_index"]
        n_valid = int(valid_all.sum())
        bad = valid_all & ((targets < 0) | (targets >= v))
        if bad.any():
            raise ValueError(f"target {int(targets[bad][0])} is outside the vocabulary of {v}")
        # Mean over zero tokens is 0 here (torch gives nan): an all-padding batch must not
        # poison the step.
        scale = 1.0 / n_valid if opts["reduction"] == "mean" and n_valid else 1.0
        gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grad_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, opts["chunk_tokens"]):
            h = hidden[start:start + opts["chunk_tokens"]]
            t = targets[start:start + opts["chunk_tokens"]]
            # The GEMM runs in the input dtype (tensor cores under bf16): it accumulates in
            # float32 but returns bf16 logits, as in Liger; softmax and loss run in float32.
            logits = (h @ weight.T).to(acc)
            if opts["impl"] == "triton":
                loss = _softmax_grad_triton(logits, t.contiguous(), opts["ignore_index"], scale,
                                            grad_h or grad_w, opts["block_v"], opts["num_warps"])
            else:
                loss = _softmax_grad_torch(logits, t, t != opts["ignore_index"], scale,
                                           grad_h or grad_w)
            total += loss.sum()
            d = logits.to(hidden.dtype) if grad_h or grad_w else logits
            if gh is not None:
                torch.mm(d, weight, out=gh[start:start + h.shape[0]])
            if gw is not None:
                if d.dtype == acc:
                    gw.addmm_(d.T, h)
                else:
                    gw += d.T @ h
            # Without this the next chunk's logits are allocated before these are freed.
            del logits, d
        ctx.save_for_backward(gh, None if gw is None else gw.to(weight.dtype))
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gh, gw = ctx.saved_tensors
        # A plain loss.backward() passes exactly 1: skip a copy of (V, H) and (N, H).
        if not torch.equal(grad_out, torch.ones_like(grad_out)):
            gh = None if gh is None else gh * grad_out.to(gh.dtype)
            gw = None if gw is None else gw * grad_out.to(gw.dtype)
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk_tokens: int = 1024, ignore_index: int = -100,
                         reduction: str = "sum", impl: str = "torch", BLOCK_V: int | None = None,
                         num_warps: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` without the full logits.

    Args:
        hidden: (N, H) final hidden states, float32, bfloat16 or float16.
        weight: (V, H) lm head, same dtype as ``hidden``.
        targets: (N,) int64 class indices; ``ignore_index`` rows add no loss and no gradient.
        chunk_tokens: tokens per chunk (see the module docstring).
        ignore_index: the target value of rows to skip.
        reduction: ``"sum"`` or ``"mean"`` over non-ignored rows (0 when there are none).
        impl: ``"torch"``, or ``"triton"`` for the fused per-row softmax kernel.
        BLOCK_V: the kernel's vocabulary block, a power of two; ``impl="triton"`` only. Named
            as in ``TRITON_SPACE`` so that ``impl="triton", **config`` takes a config of it.
        num_warps: the kernel's warps per row; ``impl="triton"`` only.

    Returns:
        The scalar loss in float32 (float64 for float64 inputs); its gradients come back in
        the inputs' dtype. The gradients are computed in this call whenever grad mode is on
        and an input requires them.

    Example:
        >>> h = torch.randn(10, 8, requires_grad=True)
        >>> w = torch.randn(50, 8, requires_grad=True)
        >>> t = torch.randint(0, 50, (10,))
        >>> loss = linear_cross_entropy(h, w, t, chunk_tokens=4)
        >>> torch.allclose(loss, linear_cross_entropy_reference(h, w, t))
        True
    """
    _check(hidden, weight, targets, chunk_tokens, reduction, impl)
    block_v = BLOCK_V
    if impl == "torch" and (block_v is not None or num_warps is not None):
        raise ValueError(f"BLOCK_V={block_v} and num_warps={num_warps} are for impl='triton'")
    if impl == "triton":
        if block_v is None:
            block_v = min(4096, 1 << max(weight.shape[0] - 1, 1).bit_length())
        num_warps = 8 if num_warps is None else num_warps
        for name, value in (("BLOCK_V", block_v), ("num_warps", num_warps)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value} is not a power of two")
    if impl == "triton" and hidden.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"impl='triton' needs CUDA tensors (got {hidden.device}) or TRITON_INTERPRET=1")
    grad = torch.is_grad_enabled()
    opts = {"chunk_tokens": chunk_tokens, "ignore_index": ignore_index, "reduction": reduction,
            "impl": impl, "block_v": block_v, "num_warps": num_warps,
            "grad_hidden": grad and hidden.requires_grad,
            "grad_weight": grad and weight.requires_grad}
    return _LinearCrossEntropy.apply(hidden, weight, targets, opts)
