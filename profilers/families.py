"""The op families cost is learned and reported by (FamilySeer style): ops of one family share
a core operator and so a cost structure, whatever their shapes.

- ``gemm``: dense projections (attention q/k/v/o, MLP), matmuls of any shape;
- ``attention``: the variable-length causal attention kernel itself (not its projections);
- ``norm``: norms and the elementwise and data-movement work around them (RoPE, SwiGLU's
  activation and product, residual adds, embedding lookups, copies);
- ``loss``: the lm head projection and cross-entropy;
- ``optimizer``: the optimizer step and gradient clipping;
- ``collective``: communication between ranks.
"""

from __future__ import annotations

__all__ = ["FAMILIES", "OP_FAMILIES"]

FAMILIES: tuple[str, ...] = ("gemm", "attention", "norm", "loss", "optimizer", "collective")
# The families a single device's sweep measures; collectives need ranks.
OP_FAMILIES: tuple[str, ...] = ("gemm", "attention", "norm", "loss", "optimizer")
