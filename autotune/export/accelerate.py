"""Accelerate: a config YAML for ``accelerate launch --config_file FILE``, FSDP2 for sharded
data parallelism as autotune runs it."""

from __future__ import annotations

from typing import Any

import yaml

from autotune.config import RunConfig
from autotune.export._base import Exporter, Mapping
from autotune.export._facts import Facts

__all__ = ["Accelerate", "distributed_type"]


def distributed_type(rc: RunConfig) -> str:
    """FSDP for ZeRO stages 1-3 (FSDP2, as autotune's trainer) and for any tensor
    parallelism (Accelerate composes it only with FSDP2); plain DDP otherwise."""
    p, device = rc.parallel, rc.workload.hardware.device
    if p.world_size == 1:
        return "NO"
    if p.dp > 1 and p.zero_stage > 0 or p.tp > 1:
        return "FSDP"
    return "MULTI_CPU" if device == "cpu" else "MULTI_GPU"


class Accelerate(Exporter):
    """Processes and machines, FSDP2 resharding, mixed precision, activation checkpointing
    (FSDP's, all layers) and Accelerate's parallelism sizes (dp replicate/shard, tp, cp).
    Batches, optimizer and data stay in the script: the trl export gives their values."""

    name = "accelerate"
    suffix = ".yaml"
    leftover = "the training script (the trl export has the Trainer's values)"

    def refusals(self, rc: RunConfig, facts: Facts) -> list[str]:
        if rc.parallel.pp > 1:
            return [f"pp={rc.parallel.pp}: Accelerate's FSDP and DeepSpeed plugins have no "
                    f"pipeline stages; export --format megatron or torchtitan instead"]
        return []

    def render(self, rc: RunConfig, facts: Facts, m: Mapping) -> str:
        hw, p = rc.workload.hardware, rc.parallel
        kind = distributed_type(rc)
        cfg: dict[str, Any] = {
            "compute_environment": "LOCAL_MACHINE", "distributed_type": kind,
            "mixed_precision": "bf16" if rc.precision.dtype == "bf16" else "no",
            "use_cpu": hw.device == "cpu", "num_machines": hw.nodes,
            "num_processes": hw.world_size, "machine_rank": 0,
            "rdzv_backend": "static" if hw.nodes == 1 else "c10d", "same_network": True,
            "main_training_function": "main", "debug": False,
        }
        m.carry("precision.dtype", "parallel.dp", "parallel.tp", "parallel.pp", "parallel.cp")
        if kind == "FSDP":
            cfg["fsdp_config"] = self._fsdp(rc, m)
        else:
            m.carry("parallel.zero_stage")
            self._checkpoint_outside_fsdp(rc, m)
        if p.tp > 1:
            cfg["parallelism_config"] = {
                "parallelism_config_dp_replicate_size": 1,
                "parallelism_config_dp_shard_size": p.dp,
                "parallelism_config_tp_size": p.tp, "parallelism_config_cp_size": p.cp}
        head = ("# accelerate launch --config_file FILE; for more machines than one, add "
                "--machine_rank R --main_process_ip HEAD --main_process_port PORT on each\n")
        return head + yaml.safe_dump(cfg, sort_keys=False)

    @staticmethod
    def _fsdp(rc: RunConfig, m: Mapping) -> dict[str, Any]:
        p, ck = rc.parallel, rc.checkpointing
        if p.zero_stage == 1:
            m.substitute("parallel.zero_stage", "FSDP2 sharding as stage 2", "FSDP2 has no "
                         "optimizer-only sharding; autotune runs stage 1 as 2 as well")
        elif p.zero_stage == 0:
            m.substitute("parallel.zero_stage", "FSDP2 sharding as stage 2", "Accelerate "
                         "composes tensor parallelism only with FSDP2")
        else:
            m.carry("parallel.zero_stage")
        if ck.policy in ("selective", "adaptive"):
            m.substitute("checkpointing.policy", "fsdp_activation_checkpointing on every layer",
                         f"FSDP's checkpointing wraps every transformer layer, not the first "
                         f"{ck.fraction:.0%}; more recompute, less memory")
        else:
            m.carry("checkpointing.policy")
        return {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": p.zero_stage == 3,
            "fsdp_activation_checkpointing": ck.policy != "none",
            "fsdp_offload_params": False, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
        }

    @staticmethod
    def _checkpoint_outside_fsdp(rc: RunConfig, m: Mapping) -> None:
        if rc.checkpointing.policy == "none":
            m.carry("checkpointing.policy")
            return
        m.substitute("checkpointing.policy", "gradient_checkpointing=True in the script",
                     "Accelerate's config carries activation checkpointing only in its FSDP "
                     "plugin")
