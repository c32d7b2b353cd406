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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ELEMENT_BYTES", "FAMILIES", "FAMILY", "OP_FAMILIES", "STEP_FAMILIES", "OpFamily",
           "analytic_cost"]

ELEMENT_BYTES = {"fp32": 4, "bf16": 2}


def _causal_pairs(seqlens: list[int], prefix: int = 0) -> int:
    """Query-key pairs a causal mask keeps: sum over segments of l(l+1)/2, plus l x prefix
    for queries that also see a prefix (a ChunkFlow chunk's state)."""
    return sum(n * (n + 1) // 2 + n * prefix for n in seqlens)


def _gemm(case: dict[str, Any], bwd: bool, e: int) -> tuple[float, float]:
    m, n, k = case["m"], case["n"], case["k"]
    return 2.0 * m * n * k * (2 if bwd else 1), (m * k + k * n + m * n) * e * (2 if bwd else 1)


def _attention(case: dict[str, Any], bwd: bool, e: int) -> tuple[float, float]:
    pairs = _causal_pairs(case["seqlens"], case.get("prefix", 0))
    flops = 4.0 * pairs * case["heads"] * case["head_dim"] * (2.5 if bwd else 1)
    tokens = sum(case["seqlens"])
    kv_tokens = tokens + case.get("prefix", 0)
    nbytes = (2 * tokens * case["heads"] + 2 * kv_tokens * case["kv_heads"]) * case["head_dim"] * e
    return flops, nbytes * (2 if bwd else 1)


# Per elementwise op: FLOPs per element and operands moved per element.
NORM_OPS = {"rms_norm": (4.0, 2), "rope": (3.0, 2), "swiglu": (5.0, 3), "add": (1.0, 3)}


def _norm(case: dict[str, Any], bwd: bool, e: int) -> tuple[float, float]:
    elems = case["tokens"] * case["width"]
    flops, operands = NORM_OPS[case["op"]]
    return flops * elems * (2 if bwd else 1), elems * e * operands * (2 if bwd else 1)


def _loss(case: dict[str, Any], bwd: bool, e: int) -> tuple[float, float]:
    t, h, v = case["tokens"], case["hidden"], case["vocab"]
    return ((2.0 * t * h * v + 5.0 * t * v) * (2 if bwd else 1),
            (t * h + h * v + 2 * t * v) * e * (2 if bwd else 1))


def _optimizer(case: dict[str, Any], bwd: bool, e: int) -> tuple[float, float]:
    # param, grad and two moments read; param and moments written
    return 12.0 * case["numel"], 7.0 * case["numel"] * e


@dataclass(frozen=True)
class OpFamily:
    """One op family's facts, in one place for every reader: the profiler sweeps the
    ``swept`` ones, the features make a column of each of ``dims`` (and of ``ops``, the op
    names within the family that cost differently), the step model composes the ``in_step``
    ones per micro-batch in this order, and the roofline prior prices ``cost``.
    tests/profilers/test_families.py asks each reader for each family."""

    name: str
    dims: tuple[str, ...]  # the case's shape columns
    cost: Callable[[dict[str, Any], bool, int], tuple[float, float]] | None  # FLOPs, bytes
    ops: tuple[str, ...] = ()
    aligned: bool = False  # whether its dims' alignment to 16 and 64 is a feature
    in_step: bool = False
    swept: bool = True  # collectives need ranks: measured by their own sweep


FAMILY: dict[str, OpFamily] = {f.name: f for f in (
    OpFamily("gemm", ("m", "n", "k"), _gemm, aligned=True, in_step=True),
    OpFamily("attention", ("heads", "kv_heads", "head_dim"), _attention, aligned=True,
             in_step=True),
    OpFamily("norm", ("tokens", "width"), _norm, ops=tuple(NORM_OPS), aligned=True, in_step=True),
    OpFamily("loss", ("tokens", "hidden", "vocab"), _loss, aligned=True, in_step=True),
    OpFamily("optimizer", ("numel", "tensors"), _optimizer),
    OpFamily("collective", (), None, swept=False),
)}
FAMILIES: tuple[str, ...] = tuple(FAMILY)
# The families a single device's sweep measures.
OP_FAMILIES: tuple[str, ...] = tuple(n for n, f in FAMILY.items() if f.swept)
# The families the step composition prices per micro-batch, in its column order.
STEP_FAMILIES: tuple[str, ...] = tuple(n for n, f in FAMILY.items() if f.in_step)


def analytic_cost(case: dict[str, Any]) -> tuple[float, float]:
    """(FLOPs, bytes moved) of a case by the usual counting: 2 per multiply-add; backward of a
    matmul is twice its forward, of attention 2.5x (FlashAttention's five matmuls to two);
    bytes are operands read plus results written once. The roofline prior and the learned
    models take these as features."""
    family = FAMILY.get(case["family"])
    if family is None or family.cost is None:
        raise ValueError(f"no analytic cost for family {case['family']!r}")
    flops, nbytes = family.cost(case, case["pass"] == "bwd", ELEMENT_BYTES[case["dtype"]])
    return float(flops), float(nbytes)
