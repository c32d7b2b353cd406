"""Estimated compute of a sequence, used to balance micro-batches and ranks."""

from __future__ import annotations

import numpy as np

from autotune.config import ModelDims

__all__ = ["sequence_flops"]


def sequence_flops(lengths: np.ndarray | int, dims: ModelDims) -> np.ndarray:
    """Forward FLOPs of whole sequences: 2 per weight per token for every projection and the
    lm head, plus causal attention's 2 * q_width * s^2 per layer (half of 4 h s^2, since a
    causal kernel skips the masked half). Backward costs about twice this, for every length
    alike, so it does not change a balance."""
    s = np.asarray(lengths, dtype=np.float64)
    linear = 2.0 * (dims.layers * dims.matmul_params_per_layer() + dims.vocab * dims.hidden) * s
    return linear + dims.layers * 2.0 * dims.q_width * s * s
