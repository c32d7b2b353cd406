"""The op-family cases worth measuring for a workload: the shapes its trainer really runs for
the candidate chunk sizes, micro-batch sizes, tensor-parallel degrees and dtypes of a search
space, plus a spread around them so that the learned models interpolate rather than
extrapolate.

Token counts per micro-batch are the union of the candidate ``micro_batch_tokens`` and
``chunk_size`` values, the geometric midpoints between neighbours, half the smallest and twice
the largest. Attention shapes come in three compositions per token count: one sequence as
long as the data allows, and two packings drawn from the workload's own length distribution;
ChunkFlow chunks also attend to a key/value prefix of one, three and seven chunks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from autotune.config import ModelDims, SearchSpace, Workload
from autotune.step_ops import layer_ops, loss_op, optimizer_tensors

__all__ = ["op_cases", "token_grid"]

_ALIGN = 16  # token counts are rounded to this: kernels like multiples, and keys stay few
_PREFIX_CHUNKS = (1, 3, 7)


def _round(n: float) -> int:
    return max(_ALIGN, int(round(n / _ALIGN)) * _ALIGN)


def token_grid(space: SearchSpace) -> list[int]:
    """Token counts per micro-batch to measure, ascending."""
    base = sorted(set(space.micro_batch_tokens) | set(space.chunk_size))
    mids = [math.sqrt(a * b) for a, b in zip(base, base[1:])]
    return sorted({_round(n) for n in [*base, *mids, base[0] / 2, base[-1] * 2]})


def _packing(lengths: np.ndarray, tokens: int, rng: np.random.Generator) -> list[int]:
    """Sequences drawn from the data until ``tokens`` are filled, the last one cut to fit."""
    out, total = [], 0
    while total < tokens:
        n = int(min(rng.choice(lengths), tokens - total))
        out.append(n)
        total += n
    return out


def _layer_ops(dims: ModelDims, tp: int, tokens: int, family: str) -> list[tuple[str, dict]]:
    """(op, shape) of every distinct op of ``family`` in one block for a micro-batch of
    ``tokens`` tokens under tp: the ops the step model prices (``step_ops.layer_ops``), so
    that every op it asks about has been measured."""
    ops = layer_ops((tokens, (tokens,), 0), dims, tp, "fp32", "sdpa", ("fwd",))
    return [(op, dict(shape)) for op, shape in dict.fromkeys((o[1], o[4]) for o in ops
                                                             if o[0] == family)]


def _optimizer_numels(dims: ModelDims, layouts: list[tuple[int, int, int, int]],
                      zero_stages: list[int]) -> set[tuple[int, int]]:
    """(parameters, tensors) one rank's optimizer steps over, per layout and zero stage."""
    out = set()
    per_layer = dims.matmul_params_per_layer()
    rest = dims.total_params() - dims.layers * per_layer  # embeddings, head, norms: not tp-split
    for dp, tp, pp, _ in layouts:
        for zero in zero_stages:
            numel = (dims.layers * per_layer // tp + rest) // pp
            if zero >= 1:
                numel //= dp
            for scale in (0.5, 1.0, 2.0):
                out.add((int(numel * scale), optimizer_tensors(dims, pp)))
    return out


def op_cases(workload: Workload, space: SearchSpace | None = None,
             families: tuple[str, ...] = ("gemm", "attention", "norm", "loss", "optimizer"),
             *, seed: int = 0) -> list[dict[str, Any]]:
    """Every case to measure, in a stable order (so a resumed sweep meets them alike)."""
    from autotune.data import load_dataset

    space = space or SearchSpace()
    dims = workload.model.resolve()
    layouts = space.parallel_layouts(workload)
    tps = sorted({layout[1] for layout in layouts})
    tokens = token_grid(space)
    max_len = workload.data.max_len
    rng = np.random.default_rng(seed)
    lengths = load_dataset(workload.data, dims).lengths if "attention" in families else None
    cases: list[dict[str, Any]] = []

    def add(family: str, op: str, passes: tuple[str, ...], dtype: str, **shape: Any) -> None:
        for p in passes:
            cases.append({"family": family, "op": op, "pass": p, "dtype": dtype, **shape})

    for dtype in space.dtype:
        fb = ("fwd", "bwd")
        if "gemm" in families:
            for tp in tps:
                for t in tokens:
                    for op, shape in _layer_ops(dims, tp, t, "gemm"):
                        add("gemm", op, fb, dtype, **shape)
        if "attention" in families:
            assert lengths is not None
            for tp in tps:
                heads = {"heads": dims.heads // tp, "kv_heads": dims.kv_heads // tp,
                         "head_dim": dims.dim_head}
                for impl in space.attention:
                    for t in tokens:
                        longest = min(t, max_len)
                        packs = [[longest] * (t // longest) + ([t % longest] if t % longest else [])]
                        packs += [_packing(lengths, t, rng) for _ in range(2)]
                        for seqlens in packs:
                            add("attention", "varlen", fb, dtype, impl=impl, seqlens=seqlens, **heads)
                    for c in sorted(set(space.chunk_size)):
                        for chunks in _PREFIX_CHUNKS:
                            if (chunks + 1) * c <= max_len:
                                add("attention", "prefix", fb, dtype, impl=impl, seqlens=[c],
                                    prefix=chunks * c, **heads)
        if "norm" in families:
            for tp in tps:
                for t in tokens:
                    for op, shape in _layer_ops(dims, tp, t, "norm"):
                        add("norm", op, fb, dtype, **shape)
        if "loss" in families:
            for t in tokens:
                _, op, _, _, shape = loss_op((t, (t,), 0), dims, dtype, "fwd")
                add("loss", op, fb, dtype, **dict(shape))
    if "optimizer" in families:
        # The optimizer keeps float32 master state whatever the compute dtype.
        for numel, tensors in sorted(_optimizer_numels(dims, layouts, space.zero_stage)):
            cases.append({"family": "optimizer", "op": "adamw", "pass": "step", "dtype": "fp32",
                          "numel": numel, "tensors": tensors, "foreach": True})
    return cases
