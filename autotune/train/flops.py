"""Model FLOPs of a step, the numerator of MFU."""

from __future__ import annotations

import numpy as np

from autotune.config import ModelDims

__all__ = ["model_flops"]


def model_flops(dims: ModelDims, lengths: np.ndarray) -> float:
    """Training FLOPs of whole sequences as they are (no padding, no recomputation):
    6 x matmul parameters x tokens, plus causal attention's 6 x layers x q_width x s^2 per
    sequence (forward 2 s^2 q_width for scores and values over the unmasked half, backward
    twice that). The embedding lookup is not a matmul and is left out."""
    s = np.asarray(lengths, dtype=np.float64)
    return float(6.0 * dims.matmul_params() * s.sum()
                 + 6.0 * dims.layers * dims.q_width * (s * s).sum())
