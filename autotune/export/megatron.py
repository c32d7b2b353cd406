"""Megatron-LM: command-line arguments for ``pretrain_gpt.py``, one per line, so that
``torchrun ... pretrain_gpt.py $(cat FILE) <data and tokenizer arguments>`` runs them."""

from __future__ import annotations

import math

from autotune.config import PADDED_POLICIES, ModelDims, RunConfig
from autotune.export._base import Exporter, Mapping
from autotune.export._facts import Facts, global_batch_note, rows_of_tokens

__all__ = ["Megatron"]

_ATTENTION_BACKEND = {"eager": "unfused", "sdpa": "auto", "blocked": "flash", "triton": "flash",
                      "varlen": "flash", "flex": "flash"}


def _model_args(dims: ModelDims) -> list[str]:
    """The decoder's shape in Megatron's terms: RMSNorm, RoPE, SwiGLU, no linear biases."""
    args = [f"--num-layers {dims.layers}", f"--hidden-size {dims.hidden}",
            f"--ffn-hidden-size {dims.ffn}", f"--num-attention-heads {dims.heads}"]
    if dims.kv_heads != dims.heads:
        args += ["--group-query-attention", f"--num-query-groups {dims.kv_heads}"]
    if dims.dim_head * dims.heads != dims.hidden:
        args.append(f"--kv-channels {dims.dim_head}")
    args += [f"--max-position-embeddings {dims.max_seq_len}", "--position-embedding-type rope",
             f"--rotary-base {dims.rope_theta:g}", "--normalization RMSNorm",
             f"--norm-epsilon {dims.norm_eps:g}", "--swiglu", "--disable-bias-linear"]
    if dims.qkv_bias:
        args.append("--add-qkv-bias")
    if not dims.tie_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    return args


class Megatron(Exporter):
    """Model-parallel sizes, batch in samples of ``--seq-length`` tokens, recompute, the
    distributed optimizer, bf16, AdamW and its warm-up, and the model's shape. Megatron's GPT
    dataset concatenates documents into samples; ``--reset-position-ids`` and
    ``--reset-attention-mask`` keep each sequence's positions and attention its own, as
    every autotune policy does."""

    name = "megatron"
    suffix = ".args"
    leftover = "the model code"

    def render(self, rc: RunConfig, facts: Facts, m: Mapping) -> str:
        s, p = rc.schedule, rc.parallel
        if s.policy in PADDED_POLICIES:
            rows = rows_of_tokens(rc, row_len=facts.seq_len, micro=s.micro_batch_size)
            m.carry("schedule.micro_batch_size")
            m.substitute("schedule.policy", f"samples of --seq-length {facts.seq_len} "
                         f"concatenated from the data", "Megatron's GPT dataset concatenates "
                         "documents and never pads; the sample length is the longest sequence")
        else:
            rows = rows_of_tokens(rc, row_len=s.micro_batch_tokens)
            m.substitute("schedule.micro_batch_tokens", f"--micro-batch-size 1 --seq-length "
                         f"{s.micro_batch_tokens}", "one sample of micro_batch_tokens "
                         "concatenated tokens per micro-batch")
            m.substitute("schedule.policy", "concatenated samples with per-document positions "
                         "and attention", f"Megatron has no {s.policy} scheduling; a sequence "
                         f"that crosses a sample boundary is cut there, without the key/value "
                         f"state ChunkFlow carries across chunks")
        m.substitute("workload.budget.global_batch_tokens", *global_batch_note(
            rc, facts, rows, what=f"samples of {rows.row_len} tokens", fill="of concatenated data"))
        args = [
            f"--tensor-model-parallel-size {p.tp}", f"--pipeline-model-parallel-size {p.pp}",
            f"--context-parallel-size {p.cp}", f"--micro-batch-size {rows.micro}",
            f"--global-batch-size {rows.global_rows}", f"--seq-length {rows.row_len}",
            "--reset-position-ids", "--reset-attention-mask",
        ]
        m.carry("parallel.dp", "parallel.tp", "parallel.pp", "parallel.cp")
        if p.cp > 1:
            m.substitute("schedule.cp_placement", "every sample sharded across the cp ranks",
                         "Megatron's context parallelism splits every sample; it has no "
                         "per-sequence placement (DACP)")
        args += self._parallel(rc, m) + self._recompute(rc, facts, m) + self._optimizer(rc, m)
        if rc.precision.dtype == "bf16":
            args.append("--bf16")
        m.carry("precision.dtype")
        args += self._kernels(rc, m) + _model_args(facts.dims)
        return "\n".join(args) + "\n"

    @staticmethod
    def _parallel(rc: RunConfig, m: Mapping) -> list[str]:
        p = rc.parallel
        args = []
        if p.tp > 1:
            args.append("--sequence-parallel")
        if p.pp > 1:
            m.substitute("parallel.pp_schedule", "Megatron's 1F1B schedule",
                         "without --num-layers-per-virtual-pipeline-stage Megatron runs 1F1B; it "
                         "has no GPipe schedule")
        # The distributed optimizer shards optimizer state and reduce-scatters gradients
        # (ZeRO-2; autotune runs stage 1 as 2 too); FSDP2 also reshards parameters (ZeRO-3).
        if p.dp > 1 and p.zero_stage in (1, 2):
            args.append("--use-distributed-optimizer")
        elif p.dp > 1 and p.zero_stage == 3:
            args.append("--use-torch-fsdp2")
        m.carry("parallel.zero_stage")
        m.substitute("schedule.rank_split", "Megatron's data-parallel sampler (arrival order)",
                     "Megatron hands each rank consecutive samples; it has no balancing")
        return args

    @staticmethod
    def _recompute(rc: RunConfig, facts: Facts, m: Mapping) -> list[str]:
        ck, pp = rc.checkpointing, rc.parallel.pp
        m.carry("checkpointing.policy")
        if ck.policy == "none":
            return []
        if ck.policy == "full":
            return ["--recompute-granularity full", "--recompute-method uniform",
                    "--recompute-num-layers 1"]
        per_stage = math.ceil(ck.checkpointed_layers(facts.dims.layers) / pp)
        m.substitute("checkpointing.fraction", f"--recompute-method block "
                     f"--recompute-num-layers {per_stage} (per pipeline stage)",
                     "Megatron's block method recomputes the first N layers of every stage; "
                     "its 'selective' granularity is attention-only recompute, another thing"
                     + ("; a fixed count where autotune decides per micro-batch"
                        if ck.policy == "adaptive" else ""))
        return ["--recompute-granularity full", "--recompute-method block",
                f"--recompute-num-layers {per_stage}"]

    @staticmethod
    def _optimizer(rc: RunConfig, m: Mapping) -> list[str]:
        o = rc.optimizer
        m.carry("optimizer.lr", "optimizer.weight_decay", "optimizer.beta1", "optimizer.beta2",
                "optimizer.warmup_steps", "optimizer.grad_clip", "seed")
        # Megatron's adam is decoupled-weight-decay AdamW; clip-grad 0 turns clipping off.
        if o.lr_schedule == "cosine":
            m.carry("optimizer.lr_schedule", "optimizer.decay_steps", "optimizer.min_lr_ratio")
            # Without --lr-decay-iters the decay spans --train-iters, as an unset
            # decay_steps spans the run.
            decay = ["--lr-decay-style cosine", f"--min-lr {o.lr * o.min_lr_ratio:g}"] + (
                [f"--lr-decay-iters {o.decay_steps}"] if o.decay_steps is not None else [])
        else:
            m.carry("optimizer.lr_schedule")
            decay = [f"--min-lr {o.lr:g}", "--lr-decay-style constant"]
        return ["--optimizer adam", f"--lr {o.lr:g}", *decay,
                f"--lr-warmup-iters {o.warmup_steps}",
                f"--weight-decay {o.weight_decay:g}", f"--adam-beta1 {o.beta1:g}",
                f"--adam-beta2 {o.beta2:g}", "--adam-eps 1e-08",
                f"--clip-grad {o.grad_clip or 0.0:g}", f"--seed {rc.seed}"]

    @staticmethod
    def _kernels(rc: RunConfig, m: Mapping) -> list[str]:
        k = rc.kernels
        backend = _ATTENTION_BACKEND[k.attention]
        m.substitute("kernels.attention", f"--attention-backend {backend}",
                     "Megatron's nearest backend: its own kernels, not autotune's")
        args = [f"--attention-backend {backend}"]
        if k.loss == "fused":
            args.append("--cross-entropy-loss-fusion")
            m.substitute("kernels.loss", "--cross-entropy-loss-fusion",
                         "Megatron fuses the cross-entropy but still forms the whole logits")
        else:
            m.carry("kernels.loss")
        return args
