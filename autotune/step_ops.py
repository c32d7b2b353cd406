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

import json
from collections import Counter
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import pandas as pd

from autotune.config import ModelDims, RunConfig
from autotune.data.plan import ChunkGroup, MicroBatch, StepPlan
from profilers.families import analytic_cost

__all__ = ["EAGER_OPS", "ParameterLayout", "count_eager_traffic", "eager_traffic", "layer_ops",
           "loss_op", "op_case", "optimizer_rows", "optimizer_tensors", "parameter_layout",
           "params_per_rank", "plan_op_rows", "signature", "step_op_rows"]


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
    """An op key as a profile-style case row with its analytic FLOPs and bytes; a norm-family
    op also carries what the trainer's unfused (eager) code moves and launches for it."""
    family, op, p, dt, shape = key
    case = {"family": family, "op": op, "pass": p, "dtype": dt,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in shape}}
    flops, nbytes = analytic_cost(case)
    case |= {"flops": flops, "bytes": nbytes}
    if family == "norm":
        kernels, per_element = eager_traffic(op, dt, p)
        case |= {"eager_kernels": kernels, "eager_bytes": per_element * case["tokens"] * case["width"]}
    elif family == "loss":
        kernels, per_logit = eager_traffic("cross_entropy", dt, p)
        case |= {"eager_kernels": kernels, "eager_bytes_per_logit": per_logit}
    return case


# count_eager_traffic's results, kept so that pricing never pays for the meta-tensor run
# (a second on first use); tests/cost_models/test_gpu_prior.py recounts them from the
# trainer's code and fails when they drift. Regenerate: python -m autotune.step_ops
EAGER_TRAFFIC_FILE = Path(__file__).resolve().parent / "eager_traffic.json"
EAGER_OPS = ("rms_norm", "rope", "swiglu", "add", "cross_entropy")


@cache
def _eager_table() -> dict[str, list]:
    return json.loads(EAGER_TRAFFIC_FILE.read_text())


def eager_traffic(op: str, dtype: str, p: str) -> tuple[int, float]:
    """(kernels launched, bytes moved per element) of one eager run of the trainer's own
    elementwise op, as ``count_eager_traffic`` counts it (kept in ``EAGER_TRAFFIC_FILE``)."""
    kernels, per_element = _eager_table()[f"{op}/{dtype}/{p}"]
    return int(kernels), float(per_element)


def count_eager_traffic(op: str, dtype: str, p: str) -> tuple[int, float]:
    """(kernels launched, bytes moved per element) of one eager run of the trainer's own
    elementwise op (``kernels.elementwise``): counted by running it on meta tensors under a
    dispatch mode, every non-view aten op one kernel that reads its inputs and writes its
    outputs once. The unfused chain (float32 upcasts, one kernel per arithmetic step) moves
    several times what the fused op's analytic count says, which a memory-bound GPU pays
    in full; a compiled block moves about the analytic count."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from kernels.elementwise import apply_rope, rms_norm, swiglu

    class Count(TorchDispatchMode):
        kernels, nbytes = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                self.kernels += 1
                self.nbytes += sum(t.numel() * t.element_size()
                                   for t in tree_leaves((args, kwargs, out))
                                   if isinstance(t, torch.Tensor))
            return out

    tokens, width, head_dim = 64, 256, 64
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32

    def leaf(*shape: int, dtype: torch.dtype = dt, grad: bool = True) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)

    if op == "rms_norm":
        x, w = leaf(tokens, width), leaf(width)
        inputs, fn = (x, w), lambda: rms_norm(x, w, 1e-5)
    elif op == "rope":
        x = leaf(tokens, width // head_dim, head_dim)
        cos = leaf(tokens, 1, head_dim // 2, dtype=torch.float32, grad=False)
        sin = leaf(tokens, 1, head_dim // 2, dtype=torch.float32, grad=False)
        inputs, fn = (x,), lambda: apply_rope(x, cos, sin)
    elif op == "swiglu":
        g, u = leaf(tokens, width), leaf(tokens, width)
        inputs, fn = (g, u), lambda: swiglu(g, u)
    elif op == "add":
        a, b = leaf(tokens, width), leaf(tokens, width)
        inputs, fn = (a, b), lambda: a + b
    elif op == "cross_entropy":  # per logit, as ``Decoder.loss_sum`` computes it unfused
        logits = leaf(tokens, width)
        labels = torch.zeros(tokens, dtype=torch.long, device="meta")
        inputs, fn = (logits,), lambda: torch.nn.functional.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="sum")
    else:
        raise ValueError(f"no eager count for norm-family op {op!r}")
    count = Count()
    if p == "fwd":
        with count:
            fn()
    else:
        out = fn()
        with count:
            torch.autograd.grad(out, inputs, torch.empty_like(out))
    return count.kernels, count.nbytes / (tokens * width)


@dataclass(frozen=True)
class ParameterLayout:
    """Parameter tensors of the trainer's decoder: per block, and outside the blocks (the
    embedding, the final norm, the lm head unless tied)."""

    block_tensors: int
    outside_tensors: int

    def tensors(self, layers: int) -> int:
        return layers * self.block_tensors + self.outside_tensors


@lru_cache(maxsize=64)
def parameter_layout(dims: ModelDims) -> ParameterLayout:
    """Counted on the trainer's own ``Decoder`` of one block, built on the meta device."""
    import torch

    from autotune.train.model import Decoder

    with torch.device("meta"):
        model = Decoder(dims.model_copy(update={"layers": 1}))
    block = sum(1 for _ in model.layers["0"].parameters())
    return ParameterLayout(block, sum(1 for _ in model.parameters()) - block)


def optimizer_tensors(dims: ModelDims, pp: int) -> int:
    """Parameter tensors one pipeline stage's optimizer steps over (every stage counted with
    the decoder's outside tensors, an upper bound the optimizer's cost barely feels)."""
    return parameter_layout(dims).tensors(dims.layers // pp)


def _rows(counts: Counter, ckpt_counts: Counter) -> dict[str, pd.DataFrame]:
    rows: dict[str, list[dict]] = {}
    for key, n in counts.items():
        rows.setdefault(key[0], []).append(op_case(key) | {"count_base": n,
                                                          "count_ckpt": ckpt_counts.get(key, 0)})
    return {fam: pd.DataFrame(r) for fam, r in rows.items()}


def runs_per_step(layers: int, again):  # noqa: ANN001, ANN201 - an int or an array of them
    """How often one micro-batch's ops run in a step of a stage of ``layers`` layers, the one
    rule the op rows (what the profiler and the features see) and the vectorized pricing
    share: each layer's forward ops once, twice where ChunkFlow runs a dropped chunk forward
    again (``again``); each layer's backward ops once; the loss forward once (twice again)
    and its backward once; and per checkpointed layer one more forward, unless the chunk
    runs forward again anyway."""
    return {"fwd": layers * (1 + again), "bwd": layers + 0 * again, "ckpt_fwd": 1 - again,
            "loss_fwd": 1 + again, "loss_bwd": 1 + 0 * again}


def plan_op_rows(plan: StepPlan, dims: ModelDims, *, tp: int = 1, pp: int = 1,
                 dtype: str = "fp32", impl: str = "sdpa", last_stage: bool = True
                 ) -> dict[str, pd.DataFrame]:
    """Per family, the distinct op shapes of one pipeline stage's step (``pp`` stages of
    equal depth) with ``count_base`` and ``count_ckpt``; the optimizer is not included."""
    layers = dims.layers // pp
    counts: Counter = Counter()
    ckpt_counts: Counter = Counter()

    def add(mb: MicroBatch, forward_again: bool) -> None:
        n = runs_per_step(layers, int(forward_again))
        for op in _micro_batch_ops(mb, dims, tp, dtype, impl, ("fwd", "bwd")):
            counts[op] += n[op[2]]
            if op[2] == "fwd" and n["ckpt_fwd"]:
                ckpt_counts[op] += n["ckpt_fwd"]
        if last_stage:
            counts[loss_op(signature(mb), dims, dtype, "fwd")] += n["loss_fwd"]
            counts[loss_op(signature(mb), dims, dtype, "bwd")] += n["loss_bwd"]

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
    rows["optimizer"] = optimizer_rows(params, optimizer_tensors(dims, p.pp))
    for frame in rows.values():
        frame["count"] = frame["count_base"] + ckpt * frame["count_ckpt"]
    return rows


def main() -> None:
    """Count every eager op's traffic again and write ``EAGER_TRAFFIC_FILE``."""
    table = {f"{op}/{dt}/{p}": list(count_eager_traffic(op, dt, p))
             for op in EAGER_OPS for dt in ("bf16", "fp32") for p in ("fwd", "bwd")}
    EAGER_TRAFFIC_FILE.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
