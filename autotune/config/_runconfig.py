"""RunConfig: a workload plus every knob the trainer honours, and the validity rules."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from autotune.config._workload import Workload

__all__ = [
    "PADDED_POLICIES", "POLICIES", "POLICY_KNOBS", "SCHEDULE_KNOBS", "CheckpointConfig",
    "KernelsConfig", "OptimizerConfig", "ParallelConfig", "PrecisionConfig", "RunConfig",
    "ScheduleConfig", "rule_violations",
]

Policy = Literal["pad-max", "pad-batch", "sorted", "pack", "chunkflow", "skrull"]
# The schedule knobs each scheduling policy reads, the one declaration that the search space,
# labels and exports derive from: a knob a policy ignores is held at one value instead of
# searched. Kept beside the schema rather than on the policy classes, which import the
# config; tests/data/test_policies.py checks each entry against what its policy plans.
POLICY_KNOBS: dict[str, tuple[str, ...]] = {
    "pad-max": ("micro_batch_size",),
    "pad-batch": ("micro_batch_size",),
    "sorted": ("micro_batch_size",),
    "pack": ("micro_batch_tokens",),
    "chunkflow": ("micro_batch_tokens", "chunk_size", "chunkflow_k"),
    "skrull": ("micro_batch_tokens",),
}
POLICIES: tuple[str, ...] = tuple(POLICY_KNOBS)
SCHEDULE_KNOBS: tuple[str, ...] = tuple(dict.fromkeys(k for ks in POLICY_KNOBS.values() for k in ks))
# Padding policies batch a count of sequences; the others fill a token budget.
PADDED_POLICIES = frozenset(p for p, ks in POLICY_KNOBS.items() if "micro_batch_size" in ks)
# Knob types a SearchSpace's choices share with the RunConfig fields they fill.
ZeroStage = Annotated[int, Field(ge=0, le=3)]
CheckpointPolicy = Literal["none", "full", "selective", "adaptive"]
AttentionKernel = Literal["sdpa", "eager", "blocked", "triton", "varlen", "flex"]
LossKernel = Literal["full", "fused"]
NormKernel = Literal["torch", "fused"]
Dtype = Literal["fp32", "bf16"]
CompileMode = Literal["none", "blocks"]
# Far past what one device holds activations for at these model sizes: a larger value is a
# typo (10**12), refused here instead of reaching the packer.
MAX_MICRO_BATCH_TOKENS = 2**24


class ScheduleConfig(BaseModel):
    """How sequences become micro-batches.

    Padding policies (pad-max, pad-batch, sorted) take ``micro_batch_size`` sequences per
    micro-batch; pack, skrull and chunkflow fill micro-batches up to ``micro_batch_tokens``.
    chunkflow splits sequences longer than ``chunk_size`` into dependent chunks and keeps
    activations for the last ``chunkflow_k`` chunks of each sequence, recomputing the rest.
    """

    model_config = ConfigDict(extra="forbid")

    policy: Policy = "chunkflow"
    chunk_size: PositiveInt = 512
    chunkflow_k: PositiveInt = 1
    micro_batch_tokens: PositiveInt = Field(512, le=MAX_MICRO_BATCH_TOKENS)
    micro_batch_size: PositiveInt = 8
    rank_split: Literal["auto", "balanced", "arrival"] = Field(
        "auto", description="how a global batch is shared among data-parallel ranks: by "
        "estimated compute, in arrival order (a distributed sampler), or the policy's own "
        "choice (compute for pack, skrull and chunkflow; arrival order for the padding "
        "baselines, sorted dealing for sorted)")
    cp_placement: Literal["dacp", "all", "none"] = Field(
        "dacp", description="with context parallelism (cp > 1), where each sequence of a "
        "micro-batch runs: dacp (Skrull: per sequence, sharded across the cp ranks or whole on "
        "the least-loaded one, whichever leaves the slowest rank least loaded; sequences "
        "longer than micro_batch_tokens always sharded), all (every sequence sharded) or none "
        "(every sequence whole); a micro-batch holds up to cp x micro_batch_tokens tokens")


class ParallelConfig(BaseModel):
    """Parallelism degrees on a (pp, dp, tp) device mesh.

    ``zero_stage`` maps onto FSDP2 (the data-parallel dimension): 0 replicates parameters
    (DDP through FSDP2's ``replicate``); 1 and 2 shard gradients and optimizer state and keep
    parameters unsharded from forward to backward (``fully_shard(reshard_after_forward=
    False)``; FSDP2 has no optimizer-only sharding, so stage 1 behaves as stage 2); 3 also
    reshards parameters after forward (``fully_shard(reshard_after_forward=True)``).
    """

    model_config = ConfigDict(extra="forbid")

    dp: PositiveInt = 1
    tp: PositiveInt = 1
    pp: PositiveInt = 1
    cp: PositiveInt = 1
    zero_stage: ZeroStage = 0
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    grad_reduce: Literal["auto", "micro_batch", "step"] = Field(
        "auto", description="when data-parallel gradients are reduced: after every micro-batch "
        "(ZeRO 2/3 keep only their shard of the gradients; ranks run equally many micro-batches) "
        "or once per step (fewer collectives; every rank holds unsharded gradients for the "
        "whole step, and ZeRO 1/2 keep parameters gathered too); auto: once per step for "
        "ZeRO 0 and chunkflow, after every micro-batch otherwise")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def reduce_per_step(self, policy: str) -> bool:
        """Whether gradients are reduced once per step (else after every micro-batch)."""
        if self.grad_reduce != "auto":
            return self.grad_reduce == "step"
        return self.zero_stage == 0 or policy == "chunkflow"


class CheckpointConfig(BaseModel):
    """Activation checkpointing: none, every layer, the first ``fraction`` of layers, or
    ``adaptive`` (Mimose): per micro-batch, the fewest leading layers that keep the predicted
    peak under ``memory_budget_gb`` (see ``autotune.train.adaptive``)."""

    model_config = ConfigDict(extra="forbid")

    policy: CheckpointPolicy = "none"
    fraction: float = Field(0.5, gt=0, le=1)
    memory_budget_gb: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _budget(self) -> CheckpointConfig:
        if self.policy == "adaptive" and self.memory_budget_gb is None:
            raise ValueError("checkpointing.policy 'adaptive' needs checkpointing.memory_budget_gb")
        return self

    def checkpointed_layers(self, layers: int) -> int:
        """Checkpointed leading layers; for ``adaptive``, which decides per micro-batch at run
        time, ``fraction`` of them stands in wherever one static count is needed."""
        if self.policy == "none":
            return 0
        if self.policy == "full":
            return layers
        return max(1, round(self.fraction * layers))


class KernelsConfig(BaseModel):
    """Which kernel runs each tunable op, and with which config.

    ``attention``: ``sdpa`` (torch's fused kernel per group of equal segments), ``eager``
    (plain math), ``blocked`` (flash-style blocks with tunable sizes), ``triton`` (GPUs),
    ``varlen`` (FlashAttention varlen: CUDA, bf16) or ``flex`` (FlexAttention with a
    document block mask, compiled: CUDA).
    ``loss``: ``full`` (lm head logits, then cross-entropy) or ``fused`` (both in token
    chunks: the logits never exist whole). ``norm``: ``torch`` or ``fused`` (RMSNorm saving
    only per-row statistics). ``configs`` pins a kernel's config (``{linear_ce: {chunk_tokens:
    2048}}``); otherwise the config comes from ``tuning_cache`` (``auto``: this device's cache
    written by ``autotune kernels tune``, when there is one; a path; ``none``) for the shape
    at hand, else the kernel's default.
    """

    model_config = ConfigDict(extra="forbid")

    attention: AttentionKernel = "sdpa"
    loss: LossKernel = "full"
    norm: NormKernel = "torch"
    configs: dict[str, dict[str, int]] = Field(default_factory=dict)
    tuning_cache: str = "auto"


class PrecisionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Dtype = "fp32"

    @property
    def itemsize(self) -> int:
        """Bytes of one activation element in the compute dtype."""
        return 2 if self.dtype == "bf16" else 4


class OptimizerConfig(BaseModel):
    """AdamW with linear warm-up, then a constant rate or a cosine decay; the same for every
    policy, so policies train alike."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    warmup_steps: NonNegativeInt = 0
    grad_clip: float | None = Field(1.0, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    decay_steps: PositiveInt | None = Field(
        None, description="cosine: the step (counted from the start, warm-up included) where "
        "the rate reaches its minimum; unset: the run's own length (autotune train --steps)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: the minimum, as a "
                                "fraction of lr")

    @model_validator(mode="after")
    def _horizon(self) -> OptimizerConfig:
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps ({self.decay_steps}) must exceed warmup_steps "
                             f"({self.warmup_steps})")
        return self

    def lr_factor(self, index: int) -> float:
        """The rate of the step with 0-based ``index``, as a fraction of ``lr``: linear
        warm-up to 1 over ``warmup_steps``, then constant, or cosine down to
        ``min_lr_ratio`` at ``decay_steps`` (held there after). A function of the step
        alone, so a resumed run needs no scheduler state and any layout gets the same rate."""
        warm = self.warmup_steps
        if warm and index < warm:
            return (index + 1) / warm
        if self.lr_schedule == "constant" or self.decay_steps is None:
            return 1.0
        progress = min(1.0, (index - warm) / (self.decay_steps - warm))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine


class RunConfig(BaseModel):
    """Complete description of one training run: the trainer needs nothing else."""

    model_config = ConfigDict(extra="forbid")

    workload: Workload = Field(default_factory=Workload)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpointing: CheckpointConfig = Field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    compile: CompileMode = Field(
        "none", description="torch.compile each transformer block (attention stays outside "
        "the compiled graph); token-budget policies (pack, skrull, chunkflow) pad micro-batches "
        "to micro_batch_tokens for static shapes, padding policies compile with dynamic shapes")
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _rules(self) -> RunConfig:
        problems = rule_violations(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def label(self) -> str:
        s, p = self.schedule, self.parallel
        knobs = POLICY_KNOBS[s.policy]
        parts = [s.policy]
        if "chunk_size" in knobs:
            parts.append(f"cs{s.chunk_size}-k{s.chunkflow_k}")
        if "micro_batch_size" in knobs:
            parts.append(f"mbs{s.micro_batch_size}")
        if "micro_batch_tokens" in knobs:
            parts.append(f"mbt{s.micro_batch_tokens}")
        if p.world_size > 1:
            parts.append(f"dp{p.dp}tp{p.tp}pp{p.pp}z{p.zero_stage}")
            if p.pp > 1:
                parts.append(p.pp_schedule)
            if p.cp > 1:
                parts.append(f"cp{p.cp}-{s.cp_placement}")
            if p.grad_reduce != "auto":
                parts.append(f"gr-{p.grad_reduce}")
        if self.checkpointing.policy != "none":
            parts.append(f"ac-{self.checkpointing.policy}")
        k = self.kernels
        if k.attention != "sdpa":
            parts.append(f"attn-{k.attention}")
        if k.loss != "full":
            parts.append(f"loss-{k.loss}")
        if k.norm != "torch":
            parts.append(f"norm-{k.norm}")
        if self.compile != "none":
            parts.append(f"compile-{self.compile}")
        parts.append(self.precision.dtype)
        return "_".join(parts)


def rule_violations(rc: RunConfig) -> list[str]:
    """Every validity rule ``rc`` breaks, each as one message naming the values."""
    problems: list[str] = []
    p, s, w = rc.parallel, rc.schedule, rc.workload
    if p.world_size != w.world_size:
        problems.append(f"dp*tp*pp*cp = {p.dp}*{p.tp}*{p.pp}*{p.cp} = {p.world_size} does not "
                        f"match the {w.world_size} devices of the workload "
                        f"(devices_per_node * nodes)")
    if rc.kernels.attention == "triton" and w.hardware.device != "cuda":
        problems.append("kernels.attention=triton needs device cuda (on CPUs its kernels run "
                        "only under TRITON_INTERPRET=1, for tests); use blocked or sdpa")
    if rc.kernels.attention in ("varlen", "flex") and w.hardware.device != "cuda":
        problems.append(f"kernels.attention={rc.kernels.attention} needs device cuda (no CPU "
                        f"kernel trains with it); use sdpa or blocked")
    if rc.kernels.attention == "varlen" and rc.precision.dtype != "bf16":
        problems.append("kernels.attention=varlen is FlashAttention, which runs in 16-bit only: "
                        "use precision.dtype bf16, or sdpa/flex in fp32")
    if rc.compile == "blocks" and rc.kernels.norm == "fused":
        problems.append("compile=blocks with kernels.norm=fused: the compiler fuses the norm "
                        "itself, and the fused kernel's tuning lookup cannot be compiled; use "
                        "kernels.norm torch")
    if p.dp > 1 and s.policy == "chunkflow" and p.grad_reduce == "micro_batch":
        problems.append("grad_reduce=micro_batch with dp > 1 cannot run chunkflow: a chunk "
                        "group's backward passes differ per rank, so per-pass reductions would "
                        "not meet their peers; use grad_reduce step (or auto)")
    dims = w.model.resolve()
    if dims.heads % p.tp or dims.kv_heads % p.tp:
        problems.append(f"tp={p.tp} does not divide heads={dims.heads} and kv_heads={dims.kv_heads}")
    if p.pp > dims.layers:
        problems.append(f"pp={p.pp} is more than layers={dims.layers}: a stage needs a layer")
    elif dims.layers % p.pp:
        problems.append(f"pp={p.pp} does not divide layers={dims.layers}")
    if p.pp > 1 and s.policy == "chunkflow":
        problems.append(f"pipeline schedule {p.pp_schedule} cannot run chunkflow: its dependent "
                        f"chunks need key/value state and a reversed backward across "
                        f"micro-batches, which pipeline schedules do not provide; use pack or "
                        f"skrull with pp > 1")
    if p.dp > 1 and p.zero_stage == 3 and s.policy == "chunkflow":
        problems.append("zero_stage=3 with dp > 1 cannot run chunkflow: ZeRO-3 gathers "
                        "parameters per forward and backward, so data-parallel ranks must run "
                        "the same sequence of passes, and chunkflow's chunk groups differ per "
                        "rank; use zero_stage 1 or 2")
    if p.pp > 1 and rc.checkpointing.policy == "adaptive":
        problems.append(f"checkpointing.policy 'adaptive' with pp={p.pp}: it plans each "
                        f"micro-batch over the whole model's layers; use full or selective "
                        f"with pipelines")
    if p.cp > 1:
        if s.policy not in ("pack", "skrull"):
            problems.append(f"cp={p.cp} with schedule.policy {s.policy}: context parallelism "
                            f"shards packed sequences; use pack or skrull")
        if p.pp > 1:
            problems.append(f"cp={p.cp} with pp={p.pp}: context parallelism inside pipeline "
                            f"stages is not built; use pp 1")
        if rc.compile == "blocks":
            problems.append(f"cp={p.cp} with compile=blocks: the sharded attention's gather runs "
                            f"per layer outside the compiled graph and is not built compiled; "
                            f"use compile none")
        if rc.checkpointing.policy == "adaptive":
            problems.append(f"cp={p.cp} with adaptive checkpointing: its per-layer memory "
                            f"model counts whole micro-batches; use none, full or selective")
        if s.micro_batch_tokens < 2 * p.cp:
            problems.append(f"cp={p.cp} with micro_batch_tokens={s.micro_batch_tokens}: a sharded "
                            f"sequence is split into 2 x cp = {2 * p.cp} pieces, and one rank "
                            f"must hold at least that many tokens")
    if s.policy == "chunkflow" and s.chunk_size > s.micro_batch_tokens:
        problems.append(f"chunkflow needs chunk_size <= micro_batch_tokens "
                        f"(chunk_size={s.chunk_size}, micro_batch_tokens={s.micro_batch_tokens})")
    if w.data.preset is not None and w.data.max_len > dims.max_seq_len:
        problems.append(f"data.max_len={w.data.max_len} exceeds the model's context limit "
                        f"max_seq_len={dims.max_seq_len}")
    return problems
