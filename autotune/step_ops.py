"""The ops one training step runs under a RunConfig, as op-family shape rows with counts:
what the step model sums family predictions over.

Per micro-batch of T tokens (padding included) and per layer: the block's projections as the
trainer shards them over tp (q, k, v, o, w1, w3, w2), attention over the micro-batch's own
sequence mix (a ChunkFlow chunk attends over its prefix), the norms and elementwise ops; then
the lm head and cross-entropy once per micro-batch; every op forward and backward. Forwards
run again for checkpointed layers and for ChunkFlow chunks whose activations were dropped.
The optimizer steps once over this rank's parameters. Communication is not among these rows.

Counts are linear in the number of checkpointed layers: ``count_base`` is a row's count with
no checkpointing and ``count_ckpt`` what each checkpointed layer adds, so the search can
price every checkpointing policy from one set of predictions.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from autotune.config import ModelDims, RunConfig
from autotune.data.plan import ChunkGroup, MicroBatch, StepPlan
from profilers.families import analytic_cost

__all__ = ["layer_ops", "loss_op", "op_case", "optimizer_rows", "params_per_rank", "plan_op_rows",
           "signature", "step_op_rows"]


def signature(mb: MicroBatch) -> tuple[int, tuple[int, ...], int]:
    """What a micro-batch's op shapes depend on: tokens, padded segment lengths, prefix."""
    return mb.tokens, tuple(s.padded for s in mb.segments), mb.segments[0].start


def _micro_batch_ops(mb: MicroBatch, dims: ModelDims, tp: int, dtype: str, impl: str,
                     passes: tuple[str, ...]) -> list[tuple]:
    return layer_ops(signature(mb), dims, tp, dtype, impl, passes)


def layer_ops(sig: tuple[int, tuple[int, ...], int], dims: ModelDims, tp: int, dtype: str,
              impl: str, passes: tuple[str, ...]) -> list[tuple]:
    """(family, op, pass, dtype, shape items) of one layer's ops for one micro-batch of
    ``signature`` ``sig``."""
    t, seqlens, prefix = sig
    q, kv, ffn = dims.q_width // tp, dims.kv_width // tp, dims.ffn // tp
    out: list[tuple] = []
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


def loss_op(sig: tuple[int, tuple[int, ...], int], dims: ModelDims, dtype: str, p: str) -> tuple:
    shape = (("tokens", sig[0]), ("hidden", dims.hidden), ("vocab", dims.vocab))
    return ("loss", "lm_head_ce", p, dtype, shape)


def op_case(key: tuple) -> dict:
    """An op key as a profile-style case row with its analytic FLOPs and bytes."""
    family, op, p, dt, shape = key
    case = {"family": family, "op": op, "pass": p, "dtype": dt,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in shape}}
    flops, nbytes = analytic_cost(case)
    return case | {"flops": flops, "bytes": nbytes}


def _rows(counts: Counter, ckpt_counts: Counter) -> dict[str, pd.DataFrame]:
    rows: dict[str, list[dict]] = {}
    for key, n in counts.items():
        rows.setdefault(key[0], []).append(op_case(key) | {"count_base": n,
                                                          "count_ckpt": ckpt_counts.get(key, 0)})
    return {fam: pd.DataFrame(r) for fam, r in rows.items()}


def plan_op_rows(plan: StepPlan, dims: ModelDims, *, tp: int = 1, pp: int = 1,
                 dtype: str = "fp32", impl: str = "sdpa", last_stage: bool = True
                 ) -> dict[str, pd.DataFrame]:
    """Per family, the distinct op shapes of one pipeline stage's step (``pp`` stages of
    equal depth) with ``count_base`` and ``count_ckpt``; the optimizer is not included."""
    layers = dims.layers // pp
    counts: Counter = Counter()
    ckpt_counts: Counter = Counter()

    def add(mb: MicroBatch, forward_again: bool) -> None:
        for op in _micro_batch_ops(mb, dims, tp, dtype, impl, ("fwd", "bwd")):
            again = op[2] == "fwd"
            counts[op] += layers + (layers if again and forward_again else 0)
            if again and not forward_again:  # a dropped chunk re-runs every layer anyway
                ckpt_counts[op] += 1
        if last_stage:
            counts[loss_op(signature(mb), dims, dtype, "fwd")] += 1 + int(forward_again)
            counts[loss_op(signature(mb), dims, dtype, "bwd")] += 1

    for unit in plan.units:
        if isinstance(unit, ChunkGroup):
            redo = len(unit.chunks) - unit.keep
            for j, mb in enumerate(unit.chunks):
                add(mb, forward_again=j < redo)
        else:
            add(unit, forward_again=False)
    return _rows(counts, ckpt_counts)


def params_per_rank(dims: ModelDims, tp: int, pp: int, dp: int, zero_stage: int) -> int:
    """Parameters whose optimizer state this rank holds."""
    n = dims.total_params() // (tp * pp)
    return n // dp if zero_stage >= 1 else n


def optimizer_rows(numel: int, tensors: int) -> pd.DataFrame:
    """The one fused AdamW step over ``numel`` fp32 parameters in ``tensors`` tensors."""
    key = ("optimizer", "adamw", "step", "fp32",
           (("numel", int(numel)), ("tensors", int(tensors)), ("foreach", True)))
    return _rows(Counter({key: 1}), Counter())["optimizer"]


def step_op_rows(rc: RunConfig, plan: StepPlan, dims: ModelDims | None = None,
                 params: int | None = None) -> dict[str, pd.DataFrame]:
    """Per family, the distinct op shapes of one rank's step under ``rc`` with how often each
    runs (``count``) and their analytic FLOPs and bytes."""
    dims = dims or rc.workload.model.resolve()
    p = rc.parallel
    ckpt = min(rc.checkpointing.checkpointed_layers(dims.layers), dims.layers) // p.pp
    rows = plan_op_rows(plan, dims, tp=p.tp, pp=p.pp, dtype=rc.precision.dtype,
                        impl=rc.kernels.attention)
    if params is None:
        params = params_per_rank(dims, p.tp, p.pp, p.dp, p.zero_stage)
    rows["optimizer"] = optimizer_rows(params, dims.layers * 9 // p.pp + 3)
    for frame in rows.values():
        frame["count"] = frame["count_base"] + ckpt * frame["count_ckpt"]
    return rows
