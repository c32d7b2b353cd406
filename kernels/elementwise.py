"""The decoder's norm and elementwise ops, shared by the trainer and the op-family sweeps so
that what is profiled is exactly what is trained."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["apply_rope", "rms_norm", "swiglu"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in float32 even under bf16 autocast: the mean of squares underflows.
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on (tokens, heads, head_dim) with cos/sin of (tokens, 1, head_dim/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).type_as(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
