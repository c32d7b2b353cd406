"""Estimated compute of a sequence, used to balance micro-batches and ranks."""

from __future__ import annotations

import numpy as np

from autotune.config import ModelDims

__all__ = ["plan_flops", "sequence_flops"]


def sequence_flops(lengths: np.ndarray | int, dims: ModelDims) -> np.ndarray:
    """Forward FLOPs of whole sequences: 2 per weight per token for every projection and the
    lm head, plus causal attention's 2 * q_width * s^2 per layer (half of 4 h s^2, since a
    causal kernel skips the masked half). Backward costs about twice this, for every length
    alike, so it does not change a balance."""
    s = np.asarray(lengths, dtype=np.float64)
    linear = 2.0 * (dims.layers * dims.matmul_params_per_layer() + dims.vocab * dims.hidden) * s
    return linear + dims.layers * 2.0 * dims.q_width * s * s


def plan_flops(plan, dims: ModelDims) -> float:
    """Estimated training FLOPs of a plan as it will run: padding included, backward at twice
    the forward, and the forwards of ChunkFlow's recomputed chunks (a chunk's attention over
    its prefix is counted as part of its sequence)."""
    from autotune.data.plan import ChunkGroup

    total = 0.0
    for unit in plan.units:
        chunks = unit.chunks if isinstance(unit, ChunkGroup) else (unit,)
        redo = len(chunks) - unit.keep if isinstance(unit, ChunkGroup) else 0
        for j, mb in enumerate(chunks):
            fwd = 0.0
            for seg in mb.segments:
                # A chunk's queries attend over start + padded keys: causal area difference.
                end = seg.start + seg.padded
                fwd += float(sequence_flops(seg.padded, dims)) - dims.layers * 2.0 * dims.q_width * (
                    seg.padded**2 - (end**2 - seg.start**2))
            total += fwd * (4 if j < redo else 3)
    return total
