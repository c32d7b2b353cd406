"""The ops one training step runs under a RunConfig, as op-family shape rows with counts:
what the step model sums family predictions over.

Per micro-batch of T tokens (padding included) and per layer: the block's projections as the
trainer shards them over tp (q, k, v, o, w1, w3, w2), attention over the micro-batch's own
sequence mix (a ChunkFlow chunk attends over its prefix), the norms and elementwise ops; then
the lm head and cross-entropy once per micro-batch; every op forward and backward. Forwards
run again for checkpointed layers and for ChunkFlow chunks whose activations were dropped.
The optimizer steps once over this rank's parameters. Communication is not among these rows.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from autotune.config import ModelDims, RunConfig
from autotune.data.plan import ChunkGroup, MicroBatch, StepPlan
from profilers.families import analytic_cost

__all__ = ["step_op_rows"]


def _micro_batch_ops(mb: MicroBatch, dims: ModelDims, tp: int, dtype: str, impl: str,
                     passes: tuple[str, ...]) -> list[tuple]:
    """(family, op, pass, dtype, shape items) of one layer's ops for one micro-batch."""
    t = mb.tokens
    q, kv, ffn = dims.q_width // tp, dims.kv_width // tp, dims.ffn // tp
    out: list[tuple] = []
    seqlens = tuple(s.padded for s in mb.segments)
    prefix = mb.segments[0].start
    for p in passes:
        for k, n in ((dims.hidden, q), (dims.hidden, kv), (dims.hidden, kv), (q, dims.hidden),
                     (dims.hidden, ffn), (dims.hidden, ffn), (ffn, dims.hidden)):
            out.append(("gemm", "linear", p, dtype, (("m", t), ("k", k), ("n", n))))
        heads = (("heads", dims.heads // tp), ("kv_heads", dims.kv_heads // tp),
                 ("head_dim", dims.dim_head), ("impl", impl))
        if prefix:
            out.append(("attention", "prefix", p, dtype,
                        heads + (("seqlens", seqlens[:1]), ("prefix", prefix))))
            if len(seqlens) > 1:
                out.append(("attention", "varlen", p, dtype, heads + (("seqlens", seqlens[1:]),)))
        else:
            out.append(("attention", "varlen", p, dtype, heads + (("seqlens", seqlens),)))
        for op, width, extra in (("rms_norm", dims.hidden, ()), ("rms_norm", dims.hidden, ()),
                                 ("add", dims.hidden, ()), ("add", dims.hidden, ()),
                                 ("swiglu", ffn, ()),
                                 ("rope", q, (("head_dim", dims.dim_head),)),
                                 ("rope", kv, (("head_dim", dims.dim_head),))):
            out.append(("norm", op, p, dtype, (("tokens", t), ("width", width)) + extra))
    return out


def step_op_rows(rc: RunConfig, plan: StepPlan, dims: ModelDims | None = None,
                 params_per_rank: int | None = None) -> dict[str, pd.DataFrame]:
    """Per family, the distinct op shapes of one rank's step with how often each runs
    (``count``) and their analytic FLOPs and bytes."""
    dims = dims or rc.workload.model.resolve()
    tp, pp = rc.parallel.tp, rc.parallel.pp
    layers = dims.layers // pp
    ckpt = min(rc.checkpointing.checkpointed_layers(dims.layers), dims.layers) // pp
    dtype, impl = rc.precision.dtype, rc.kernels.attention
    counts: Counter = Counter()

    def add(mb: MicroBatch, forward_again: bool) -> None:
        again = layers if forward_again else ckpt  # layers whose forward runs a second time
        for op in _micro_batch_ops(mb, dims, tp, dtype, impl, ("fwd", "bwd")):
            counts[op] += layers + (again if op[2] == "fwd" else 0)
        shape = (("tokens", mb.tokens), ("hidden", dims.hidden), ("vocab", dims.vocab))
        counts[("loss", "lm_head_ce", "fwd", dtype, shape)] += 1 + int(forward_again)
        counts[("loss", "lm_head_ce", "bwd", dtype, shape)] += 1

    for unit in plan.units:
        if isinstance(unit, ChunkGroup):
            redo = len(unit.chunks) - unit.keep
            for j, mb in enumerate(unit.chunks):
                add(mb, forward_again=j < redo)
        else:
            add(unit, forward_again=False)
    if params_per_rank is None:
        params_per_rank = dims.total_params() // (tp * pp)
        if rc.parallel.zero_stage >= 1:
            params_per_rank //= rc.parallel.dp
    counts[("optimizer", "adamw", "step", "fp32",
            (("numel", int(params_per_rank)), ("tensors", dims.layers * 9 // pp + 3),
             ("foreach", True)))] += 1

    rows: dict[str, list[dict]] = {}
    for (family, op, p, dt, shape), n in counts.items():
        case = {"family": family, "op": op, "pass": p, "dtype": dt,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in shape}}
        flops, nbytes = analytic_cost(case)
        rows.setdefault(family, []).append(case | {"flops": flops, "bytes": nbytes, "count": n})
    return {fam: pd.DataFrame(r) for fam, r in rows.items()}

