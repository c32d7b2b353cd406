"""TRL: ``SFTConfig`` keyword arguments as YAML, for ``trl sft --config FILE`` or
``SFTConfig(**yaml.safe_load(...))``; launch it with the accelerate export."""

from __future__ import annotations

from typing import Any

import yaml

from autotune.config import PADDED_POLICIES, RunConfig
from autotune.export._base import Exporter, Mapping
from autotune.export._facts import (
    Facts,
    RowBatch,
    global_batch_note,
    rows_of_sequences,
    rows_of_tokens,
)

__all__ = ["Trl"]


class Trl(Exporter):
    """Packing (best-fit-decreasing, padding-free) or padded batches, sizes per device,
    gradient accumulation, bf16, gradient checkpointing and AdamW with a constant rate after
    warm-up. Devices and sharding come from ``accelerate launch`` with the accelerate
    export; TRL has no pipeline parallelism."""

    name = "trl"
    suffix = ".yaml"
    leftover = "the model or the accelerate config"

    def refusals(self, rc: RunConfig, facts: Facts) -> list[str]:
        if rc.parallel.pp > 1:
            return [f"pp={rc.parallel.pp}: TRL's trainer has no pipeline parallelism; export "
                    f"--format megatron or torchtitan instead"]
        return []

    def render(self, rc: RunConfig, facts: Facts, m: Mapping) -> str:
        o = rc.optimizer
        kwargs: dict[str, Any] = self._batches(rc, facts, m)
        kwargs |= {
            "bf16": rc.precision.dtype == "bf16",
            "gradient_checkpointing": rc.checkpointing.policy != "none",
            "optim": "adamw_torch", "learning_rate": o.lr, "weight_decay": o.weight_decay,
            "adam_beta1": o.beta1, "adam_beta2": o.beta2, "adam_epsilon": 1e-8,
            # 0 turns the Trainer's clipping off, as grad_clip None does in autotune.
            "max_grad_norm": o.grad_clip or 0.0,
            "lr_scheduler_type": "constant_with_warmup", "warmup_steps": o.warmup_steps,
            "seed": rc.seed,
        }
        if o.lr_schedule == "cosine":
            kwargs |= {"lr_scheduler_type": "cosine_with_min_lr",
                       "lr_scheduler_kwargs": {"min_lr_rate": o.min_lr_ratio}}
            m.carry("optimizer.lr_schedule", "optimizer.min_lr_ratio")
            if o.decay_steps is not None:
                m.substitute("optimizer.decay_steps", "the Trainer's max_steps",
                             "Transformers' cosine spans the whole run: give max_steps "
                             f"{o.decay_steps} for the same curve")
        m.carry("precision.dtype", "optimizer.lr", "optimizer.weight_decay", "optimizer.beta1",
                "optimizer.beta2", "optimizer.grad_clip", "optimizer.warmup_steps",
                "optimizer.lr_schedule", "seed",
                "parallel.dp", "parallel.pp", "parallel.cp")
        ck = rc.checkpointing
        if ck.policy in ("selective", "adaptive"):
            m.substitute("checkpointing.policy", "gradient_checkpointing: true (every layer)",
                         f"the Trainer checkpoints every layer, not the first {ck.fraction:.0%}; "
                         f"more recompute, less memory (Transformers 5's "
                         f"activation_checkpointing_kwargs every_n_layers would come nearer, "
                         f"but 4.x, which TRL 1.x also runs on, lacks it)")
        else:
            m.carry("checkpointing.policy")
        kwargs["model_init_kwargs"] = {"attn_implementation": _attention(rc, kwargs, m)}
        if rc.kernels.loss == "fused":
            m.substitute("kernels.loss", "not set; use_liger_kernel: true is the nearest",
                         "Liger's fused linear cross-entropy also never forms whole logits, "
                         "but needs the liger-kernel package")
        if rc.parallel.tp == 1:
            m.carry("parallel.tp")
        for knob in ("parallel.tp", "parallel.zero_stage"):
            if knob not in m.carried:
                m.substitute(knob, "the accelerate export's FSDP2 and parallelism settings",
                             "the Trainer takes sharding and tensor parallelism from the "
                             "Accelerate config it is launched with")
        return yaml.safe_dump(kwargs, sort_keys=False)

    @staticmethod
    def _batches(rc: RunConfig, facts: Facts, m: Mapping) -> dict[str, Any]:
        s = rc.schedule
        if s.policy in PADDED_POLICIES:
            rows = rows_of_sequences(rc, facts, micro=s.micro_batch_size)
            m.carry("schedule.micro_batch_size")
            kwargs: dict[str, Any] = {"packing": False, "padding_free": False,
                                      "max_length": facts.seq_len}
            if s.policy == "pad-max":
                # Every batch padded to a multiple of the longest sequence is padded to it.
                kwargs["pad_to_multiple_of"] = facts.seq_len
                m.carry("schedule.policy")
            elif s.policy == "sorted":
                kwargs["group_by_length"] = True
                m.substitute("schedule.policy", "group_by_length: true", "the Trainer groups "
                             "sequences of similar length in randomized mega-batches instead "
                             "of sorting each global batch")
            else:
                m.carry("schedule.policy")
            what = "sequences"
        else:
            rows = rows_of_tokens(rc, row_len=max(s.micro_batch_tokens, facts.seq_len))
            kwargs = {"packing": True, "packing_strategy": "bfd", "padding_free": True,
                      "max_length": rows.row_len}
            _substitute_packing(rc, facts, rows, m)
            what = f"packs of up to {rows.row_len} tokens"
        m.substitute("workload.budget.global_batch_tokens", *global_batch_note(
            rc, facts, rows, what=what, fill="when the packs are full"))
        return kwargs | {"per_device_train_batch_size": rows.micro,
                         "gradient_accumulation_steps": rows.accumulation}


def _attention(rc: RunConfig, kwargs: dict[str, Any], m: Mapping) -> str:
    attention = rc.kernels.attention
    if not kwargs["padding_free"] and attention in ("sdpa", "eager"):
        m.carry("kernels.attention")
        return attention
    m.substitute("kernels.attention", "flash_attention_2",
                 "padding-free packs keep sequences apart only under a flash-attention kernel"
                 if kwargs["padding_free"] else
                 f"Transformers' nearest kernel to autotune's {attention} attention")
    return "flash_attention_2"


def _substitute_packing(rc: RunConfig, facts: Facts, rows: RowBatch, m: Mapping) -> None:
    s = rc.schedule
    if rows.row_len > s.micro_batch_tokens:
        m.substitute("schedule.micro_batch_tokens", f"max_length {rows.row_len}, one pack per "
                     f"micro-batch", f"TRL cuts sequences longer than max_length, where "
                     f"autotune trains such a sequence whole in a micro-batch of its own; "
                     f"packs grow to the longest sequence ({facts.seq_len}) so no token is lost")
    else:
        m.carry("schedule.micro_batch_tokens")
    if s.policy == "pack":
        m.carry("schedule.policy")
    else:
        m.substitute("schedule.policy", "packing_strategy bfd", f"TRL has no {s.policy}: "
                     f"best-fit-decreasing packing keeps each sequence whole with its own "
                     f"attention, where wrapped packing would cut sequences at pack edges")
