"""SearchSpace: declarative choices per knob plus the validity rules of RunConfig."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from autotune.config._runconfig import (
    POLICIES,
    POLICY_KNOBS,
    SCHEDULE_KNOBS,
    AttentionKernel,
    CheckpointPolicy,
    CompileMode,
    Dtype,
    LossKernel,
    NormKernel,
    Policy,
    RunConfig,
    ZeroStage,
    rule_violations,
)
from autotune.config._workload import Workload

__all__ = ["SearchSpace", "tp_degrees"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, t = [], lo
    while t <= hi:
        out.append(t)
        t *= 2
    return out


def tp_degrees(workload: Workload) -> list[int]:
    """Tensor-parallel degrees a node can host: divisors of its devices that divide the
    model's heads and key/value heads."""
    dims = workload.model.resolve()
    return [d for d in _divisors(workload.hardware.devices_per_node)
            if dims.heads % d == 0 and dims.kv_heads % d == 0]


def _tokens_memory_allows(workload: Workload) -> int:
    """The most tokens one micro-batch can hold on one device in the most frugal layout the
    space offers (full checkpointing, the fused loss, the widest tensor parallelism): each
    token keeps one bf16 hidden vector per layer plus one layer's activations, as the memory
    model counts them; the rest of the memory cap is left to the model's state."""
    dims = workload.model.resolve()
    tp = max(tp_degrees(workload))
    per_token = 2 * (dims.layers * dims.hidden + 3 * dims.hidden
                     + (2 * dims.q_width + 2 * dims.kv_width + 3 * dims.ffn) // tp)
    fits = max(1, int(workload.budget.memory_cap_gb * 2**30 / per_token))
    return 1 << (fits.bit_length() - 1)  # the largest power of two that fits


def _divisor_layouts(world: int) -> list[tuple[int, int, int, int]]:
    out = []
    for tp, pp, cp in itertools.product(range(1, world + 1), repeat=3):
        if world % (tp * pp * cp) == 0:
            out.append((world // (tp * pp * cp), tp, pp, cp))
    return out


class SearchSpace(BaseModel):
    """The choices the search may make for each knob of a RunConfig.

    Values are lists of choices; a candidate is valid when every value lies in its list and
    the RunConfig validity rules hold (degrees multiply to the world size, tp divides the
    heads, pp the layers, chunk_size fits a micro-batch, ...).
    """

    model_config = ConfigDict(extra="forbid")

    policy: list[Policy] = Field(default_factory=lambda: list(POLICIES))
    chunk_size: list[PositiveInt] = Field(default_factory=lambda: [128, 256, 512, 1024])
    chunkflow_k: list[PositiveInt] = Field(default_factory=lambda: [1, 2])
    micro_batch_tokens: list[PositiveInt] = Field(
        default_factory=lambda: [256, 512, 1024, 2048, 4096])
    micro_batch_size: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    zero_stage: list[ZeroStage] = Field(default_factory=lambda: [0])
    checkpointing: list[CheckpointPolicy] = Field(
        default_factory=lambda: ["none", "selective", "full"])
    # Kernel choices (see KernelsConfig); a config of each comes from the tuning cache.
    attention: list[AttentionKernel] = Field(default_factory=lambda: ["sdpa"])
    loss: list[LossKernel] = Field(default_factory=lambda: ["full"])
    norm: list[NormKernel] = Field(default_factory=lambda: ["torch"])
    dtype: list[Dtype] = Field(default_factory=lambda: ["fp32"])
    # torch.compile per block (RunConfig.compile); "none" only by default, since compiling
    # costs each measured trial its compile time (seconds to a minute).
    compile: list[CompileMode] = Field(default_factory=lambda: ["none"])
    # Parallel degrees to try; None: every degree the device count and the model allow.
    tp: list[PositiveInt] | None = None
    pp: list[PositiveInt] | None = None
    # Context parallelism is opt-in: it pays only for long sequences (the GPU default space
    # adds it past 32K tokens); None: every degree the device count allows.
    cp: list[PositiveInt] | None = [1]

    @classmethod
    def default_for(cls, workload: Workload, *, longest: int | None = None) -> SearchSpace:
        """The built-in space for ``workload``'s devices. On a CPU, the small space that keeps
        ``make run`` quick. On GPUs, derived from the model, the data's longest sequence
        (``longest``, else ``data.max_len``), the memory cap and the node layout: bf16
        everywhere; ZeRO 0, 2 and 3 (FSDP2 has no optimizer-only sharding, so 1 would price
        and run as 2); micro-batch tokens and chunk sizes in powers of two from 1K up to the
        longest sequence and what one device's memory can hold at full checkpointing; tp
        over the divisors of a node's devices, pp over the divisors of the node count;
        no/selective/full checkpointing; the fused loss; per-block compile; FlashAttention
        varlen; context parallelism (2, 4, 8 within a node) for sequences past 32K tokens or
        more than one device holds."""
        if workload.hardware.device != "cuda":
            return cls()
        dims = workload.model.resolve()
        hw = workload.hardware
        longest = longest or workload.data.max_len
        one_device = _tokens_memory_allows(workload)
        top = min(_pow2_at_least(longest), one_device,
                  _pow2_at_least(workload.budget.global_batch_tokens))
        # Context parallelism where one device cannot hold the longest sequence whole, or
        # where it is long enough (past 32K) for its attention to dominate a device's step
        cps = [1] + ([c for c in (2, 4, 8) if c <= hw.devices_per_node]
                     if longest > min(one_device, 32768) else [])
        tokens = [t for t in _powers_of_two(1024, max(top, 1024))]
        chunks = [t for t in tokens if t < longest] or tokens[:1]
        return cls(
            policy=["pad-batch", "sorted", "pack", "chunkflow", "skrull"],
            micro_batch_tokens=tokens, chunk_size=chunks, chunkflow_k=[1, 2],
            micro_batch_size=[1, 2, 4, 8], zero_stage=[0, 2, 3],
            checkpointing=["none", "selective", "full"], attention=["varlen"],
            loss=["full", "fused"], norm=["torch"], dtype=["bf16"], compile=["none", "blocks"],
            tp=tp_degrees(workload),
            pp=[d for d in _divisors(hw.nodes) if dims.layers % d == 0], cp=cps)

    def parallel_layouts(self, workload: Workload) -> list[tuple[int, int, int, int]]:
        """(dp, tp, pp, cp) for the workload's devices, filtered by the shape rules."""
        dims = workload.model.resolve()
        return [(dp, tp, pp, cp) for dp, tp, pp, cp in _divisor_layouts(workload.world_size)
                if dims.heads % tp == 0 and dims.kv_heads % tp == 0 and dims.layers % pp == 0
                and all(getattr(self, k) is None or v in getattr(self, k)
                        for k, v in (("tp", tp), ("pp", pp), ("cp", cp)))]

    def violations(self, rc: RunConfig) -> list[str]:
        """Why ``rc`` is outside this space, or an empty list."""
        s = rc.schedule
        checks = {
            "policy": s.policy, **{k: getattr(s, k) for k in POLICY_KNOBS[s.policy]},
            "checkpointing": rc.checkpointing.policy,
            "attention": rc.kernels.attention, "loss": rc.kernels.loss,
            "norm": rc.kernels.norm, "dtype": rc.precision.dtype, "compile": rc.compile,
        }
        for k in ("tp", "pp", "cp"):
            if getattr(self, k) is not None:
                checks[k] = getattr(rc.parallel, k)
        if rc.parallel.dp * rc.parallel.cp > 1:  # the stage shards over dp x cp ranks only
            checks["zero_stage"] = rc.parallel.zero_stage
        out = [f"{k}={v!r} is not among the choices {getattr(self, k)}"
               for k, v in checks.items() if v not in getattr(self, k)]
        return out + rule_violations(rc)

    def grid(self, workload: Workload) -> Iterator[RunConfig]:
        """Every valid RunConfig of the space, in a stable order. Knobs a policy ignores are
        held at their first choice, so no config appears twice."""
        ignored_default = {k: getattr(self, k)[0] for k in SCHEDULE_KNOBS}
        for policy in self.policy:
            knobs = POLICY_KNOBS[policy]
            for values in itertools.product(*(getattr(self, k) for k in knobs)):
                sched = {**ignored_default, **dict(zip(knobs, values, strict=True)),
                         "policy": policy}
                for layout in self.parallel_layouts(workload):
                    # Without data parallelism there is nothing to shard: every stage is
                    # the same run, spelled once as stage 0.
                    zeros = self.zero_stage if layout[0] * layout[3] > 1 else [0]
                    for zero, ckpt, attn, loss, norm, dtype, comp in itertools.product(
                            zeros, self.checkpointing, self.attention, self.loss, self.norm,
                            self.dtype, self.compile):
                        data = {
                            "workload": workload, "schedule": sched,
                            "parallel": dict(zip(("dp", "tp", "pp", "cp"), layout, strict=True),
                                             zero_stage=zero),
                            "checkpointing": {"policy": ckpt},
                            "kernels": {"attention": attn, "loss": loss, "norm": norm},
                            "precision": {"dtype": dtype}, "compile": comp,
                        }
                        try:
                            yield RunConfig.model_validate(data)
                        except ValueError:
                            continue

    def canonical(self, rc: RunConfig) -> RunConfig:
        """``rc`` spelled as ``grid`` spells it: the schedule knobs its policy ignores held
        at their first choice, so an equivalent config compares equal."""
        keep = POLICY_KNOBS[rc.schedule.policy]
        ignored = {k: getattr(self, k)[0] for k in SCHEDULE_KNOBS if k not in keep}
        update = {"schedule": rc.schedule.model_copy(update=ignored)}
        if rc.parallel.dp * rc.parallel.cp == 1:
            update["parallel"] = rc.parallel.model_copy(update={"zero_stage": 0})
        return rc.model_copy(update=update)
