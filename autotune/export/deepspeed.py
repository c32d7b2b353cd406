"""DeepSpeed: a ``ds_config.json`` for ``deepspeed.initialize(config=...)``."""

from __future__ import annotations

import json

from autotune.config import PADDED_POLICIES, RunConfig
from autotune.export._base import Exporter, Mapping
from autotune.export._facts import Facts, global_batch_note, rows_of_sequences

__all__ = ["DeepSpeed", "bucket_sizes"]

# torch.optim.AdamW's default, which the reference trainer uses.
ADAM_EPS = 1e-8


def bucket_sizes(hidden: int, stage: int) -> dict[str, int]:
    """ZeRO's communication buckets sized from the hidden width, as the Hugging Face
    integration fills DeepSpeed's "auto" values: large enough that a layer's gradients go in
    a few collectives, small enough not to hold gigabytes of staging memory."""
    if stage == 0:
        return {}
    if stage < 3:
        return {"reduce_bucket_size": hidden * hidden, "allgather_bucket_size": hidden * hidden}
    return {"reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


class DeepSpeed(Exporter):
    """ZeRO stage, batch sizes, bf16, AdamW with WarmupLR, gradient clipping, the
    activation-checkpointing section, AutoTP's tensor-parallel size and the pipeline
    stage count. DeepSpeed has no packing: micro-batches are whole sequences."""

    name = "deepspeed"
    suffix = ".json"
    leftover = "the model code or the training script"

    def refusals(self, rc: RunConfig, facts: Facts) -> list[str]:
        p = rc.parallel
        out = []
        if p.cp > 1:
            out.append(f"cp={p.cp}: a DeepSpeed config has no context-parallel degree")
        if p.pp > 1 and p.zero_stage > 1:
            out.append(f"pp={p.pp} with zero_stage={p.zero_stage}: DeepSpeed's pipeline "
                       f"engine runs only ZeRO stages 0 and 1")
        if p.tp > 1 and p.pp > 1:
            out.append(f"tp={p.tp} with pp={p.pp}: DeepSpeed's AutoTP training shards models "
                       f"outside its pipeline engine, not pipeline stages")
        return out

    def render(self, rc: RunConfig, facts: Facts, m: Mapping) -> str:
        s, p, o = rc.schedule, rc.parallel, rc.optimizer
        if s.policy in PADDED_POLICIES:
            rows = rows_of_sequences(rc, facts, micro=s.micro_batch_size)
            m.carry("schedule.micro_batch_size")
            m.substitute("schedule.policy", f"{s.policy} batches from the script's data loader",
                         "DeepSpeed trains on the batches the script's loader yields; its "
                         "collate function does the padding")
        else:
            rows = rows_of_sequences(rc, facts, micro=max(1, s.micro_batch_tokens // facts.seq_len))
            m.substitute("schedule.policy", "padded micro-batches of whole sequences",
                         f"DeepSpeed batches by sequences and has no packing, chunking or "
                         f"compute balancing ({s.policy})")
            m.substitute("schedule.micro_batch_tokens",
                         f"train_micro_batch_size_per_gpu={rows.micro}",
                         f"micro_batch_tokens // longest sequence ({facts.seq_len}), at least "
                         f"1: padded to the longest, a micro-batch stays within the token budget "
                         f"whenever one longest sequence does")
        sub, why = global_batch_note(rc, facts, rows, what="sequences")
        if p.tp > 1:
            why += ("; train_batch_size is left for DeepSpeed to derive: under AutoTP its "
                    "batch rule counts tensor-parallel peers as ranks")
        m.substitute("workload.budget.global_batch_tokens", sub, why)
        cfg: dict = {
            "train_micro_batch_size_per_gpu": rows.micro,
            "gradient_accumulation_steps": rows.accumulation,
            "gradient_clipping": o.grad_clip or 0.0,
            "bf16": {"enabled": rc.precision.dtype == "bf16"},
            "zero_optimization": {"stage": p.zero_stage, **bucket_sizes(facts.dims.hidden,
                                                                       p.zero_stage)},
            "optimizer": {"type": "AdamW", "params": {
                "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": ADAM_EPS,
                "weight_decay": o.weight_decay}},
        }
        if p.tp == 1:
            cfg = {"train_batch_size": rows.global_rows, **cfg}
        m.carry("parallel.dp", "parallel.zero_stage", "precision.dtype", "optimizer.lr",
                "optimizer.beta1", "optimizer.beta2", "optimizer.weight_decay",
                "optimizer.grad_clip")
        if p.zero_stage > 0:
            cfg["zero_optimization"] |= {"overlap_comm": True, "contiguous_gradients": True}
        if o.lr_schedule == "cosine" and o.decay_steps is not None:
            cfg["scheduler"] = {"type": "WarmupCosineLR", "params": {
                "total_num_steps": o.decay_steps, "warmup_min_ratio": 0.0,
                "warmup_num_steps": o.warmup_steps, "cos_min_ratio": o.min_lr_ratio,
                "warmup_type": "linear"}}
            m.carry("optimizer.lr_schedule", "optimizer.decay_steps", "optimizer.min_lr_ratio")
        elif o.warmup_steps > 1:
            # WarmupLR stretches a ramp shorter than 2 steps to 2; with 0 or 1 step autotune's
            # rate is constant from the first step, which needs no scheduler at all.
            cfg["scheduler"] = {"type": "WarmupLR", "params": {
                "warmup_min_lr": 0.0, "warmup_max_lr": o.lr, "warmup_num_steps": o.warmup_steps,
                "warmup_type": "linear"}}
        if o.lr_schedule == "cosine" and o.decay_steps is None:
            m.substitute("optimizer.lr_schedule", "constant after the warm-up",
                         "DeepSpeed's WarmupCosineLR needs its length (total_num_steps); set "
                         "optimizer.decay_steps to export the cosine decay")
        m.carry("optimizer.warmup_steps", "optimizer.lr_schedule")
        self._checkpointing(rc, facts, m, cfg)
        self._model_parallel(rc, m, cfg)
        return json.dumps(cfg, indent=2) + "\n"

    @staticmethod
    def _checkpointing(rc: RunConfig, facts: Facts, m: Mapping, cfg: dict) -> None:
        ck = rc.checkpointing
        layers = ck.checkpointed_layers(facts.dims.layers)
        if not layers:
            m.carry("checkpointing.policy")
            return
        cfg["activation_checkpointing"] = {
            "partition_activations": False, "contiguous_memory_optimization": False,
            "cpu_checkpointing": False, "number_checkpoints": layers,
            "synchronize_checkpoint_boundary": False, "profile": False}
        m.substitute("checkpointing.policy", f"activation_checkpointing.number_checkpoints="
                     f"{layers} of {facts.dims.layers} layers",
                     f"the section configures deepspeed.checkpointing; the model code passes "
                     f"the first {layers} of its layers through deepspeed.checkpointing.checkpoint"
                     + (", a fixed count where autotune decides per micro-batch"
                        if ck.policy == "adaptive" else ""))
        m.carry("checkpointing.fraction")

    @staticmethod
    def _model_parallel(rc: RunConfig, m: Mapping, cfg: dict) -> None:
        p = rc.parallel
        if p.tp > 1:
            cfg["tensor_parallel"] = {"autotp_size": p.tp}
        m.carry("parallel.tp", "parallel.cp")
        if p.pp == 1:
            m.carry("parallel.pp")
            return
        cfg["pipeline"] = {"stages": p.pp}
        m.substitute("parallel.pp", f"pipeline.stages={p.pp}", f"DeepSpeed takes the stage "
                     f"count from the model, a deepspeed.pipe.PipelineModule(num_stages={p.pp}); "
                     f"the config records it")
        m.substitute("parallel.pp_schedule", "DeepSpeed's 1F1B train schedule",
                     "its pipeline engine has the one schedule")
