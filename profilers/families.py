"""The op families cost is learned and reported by (FamilySeer style): ops of one family share
a core operator and so a cost structure, whatever their shapes.

- ``gemm``: dense projections (attention q/k/v/o, MLP), matmuls of any shape;
- ``attention``: the variable-length causal attention kernel itself (not its projections);
- ``norm``: norms and the elementwise and data-movement work around them (RoPE, SwiGLU's
  activation and product, residual adds, embedding lookups, copies);
- ``loss``: the lm head projection and cross-entropy;
- ``optimizer``: the optimizer step and gradient clipping;
- ``collective``: communication between ranks.

The analytic cost of a case (FLOPs and bytes by the usual counting) lives here, beside the
family names, because both the sweeps that measure a case and the cost models that predict
one need it, and it is plain arithmetic.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ELEMENT_BYTES", "FAMILIES", "OP_FAMILIES", "analytic_cost"]

FAMILIES: tuple[str, ...] = ("gemm", "attention", "norm", "loss", "optimizer", "collective")
# The families a single device's sweep measures; collectives need ranks.
OP_FAMILIES: tuple[str, ...] = ("gemm", "attention", "norm", "loss", "optimizer")

ELEMENT_BYTES = {"fp32": 4, "bf16": 2}
_ELEM = ELEMENT_BYTES


def _causal_pairs(seqlens: list[int], prefix: int = 0) -> int:
    """Query-key pairs a causal mask keeps: sum over segments of l(l+1)/2, plus l x prefix
    for queries that also see a prefix (a ChunkFlow chunk's state)."""
    return sum(n * (n + 1) // 2 + n * prefix for n in seqlens)


def analytic_cost(case: dict[str, Any]) -> tuple[float, float]:
    """(FLOPs, bytes moved) of a case by the usual counting: 2 per multiply-add; backward of a
    matmul is twice its forward, of attention 2.5x (FlashAttention's five matmuls to two);
    bytes are operands read plus results written once. The roofline prior and the learned
    models take these as features."""
    fam, p, e = case["family"], case["pass"], _ELEM[case["dtype"]]
    bwd = p == "bwd"
    if fam == "gemm":
        m, n, k = case["m"], case["n"], case["k"]
        flops = 2.0 * m * n * k * (2 if bwd else 1)
        nbytes = (m * k + k * n + m * n) * e * (2 if bwd else 1)
    elif fam == "attention":
        pairs = _causal_pairs(case["seqlens"], case.get("prefix", 0))
        flops = 4.0 * pairs * case["heads"] * case["head_dim"] * (2.5 if bwd else 1)
        tokens = sum(case["seqlens"])
        kv_tokens = tokens + case.get("prefix", 0)
        nbytes = (2 * tokens * case["heads"] + 2 * kv_tokens * case["kv_heads"]) * case["head_dim"] * e
        nbytes *= 2 if bwd else 1
    elif fam == "norm":
        elems = case["tokens"] * case["width"]
        flops = {"rms_norm": 4.0, "rope": 3.0, "swiglu": 5.0, "add": 1.0}[case["op"]] * elems
        operands = {"rms_norm": 2, "rope": 2, "swiglu": 3, "add": 3}[case["op"]]
        nbytes = elems * e * operands * (2 if bwd else 1)
        flops *= 2 if bwd else 1
    elif fam == "loss":
        t, h, v = case["tokens"], case["hidden"], case["vocab"]
        flops = (2.0 * t * h * v + 5.0 * t * v) * (2 if bwd else 1)
        nbytes = (t * h + h * v + 2 * t * v) * e * (2 if bwd else 1)
    elif fam == "optimizer":
        flops = 12.0 * case["numel"]
        nbytes = 7.0 * case["numel"] * e  # param, grad, two moments read; param, moments written
    else:
        raise ValueError(f"no analytic cost for family {fam!r}")
    return float(flops), float(nbytes)
