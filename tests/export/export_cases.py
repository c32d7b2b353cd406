"""RunConfigs that between them reach every branch of the exporters: each policy family,
each ZeRO stage, tensor and pipeline parallelism, every checkpointing policy, one node and
two, CPU and CUDA. Small model and data, so that building them costs milliseconds.
(A plain module, not a conftest: the export tests import it by name.)"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from autotune.config import RunConfig
from autotune.data import load_dataset
from autotune.export import Facts

MODEL = {"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 256,
         "max_seq_len": 1024}
DATA = {"preset": "longsft", "num_sequences": 128, "max_len": 512, "seed": 0}
# Where golden slurm scripts say the RunConfig lives: a fixed path, not a tmp folder.
JOB_PATH = Path("/jobs/run.yaml")


def _rc(*, devices: int = 1, nodes: int = 1, device: str = "cuda", gbt: int = 4096,
        **sections: Any) -> dict[str, Any]:
    return {"workload": {"model": MODEL, "data": DATA,
                         "hardware": {"device": device, "devices_per_node": devices,
                                      "nodes": nodes},
                         "budget": {"global_batch_tokens": gbt}}, **sections}


CASES: dict[str, dict[str, Any]] = {
    "pack-dp4-zero3-full-bf16": _rc(
        devices=4, schedule={"policy": "pack", "micro_batch_tokens": 1024},
        parallel={"dp": 4, "zero_stage": 3}, checkpointing={"policy": "full"},
        precision={"dtype": "bf16"}, optimizer={"warmup_steps": 20, "weight_decay": 0.1,
                                                "lr_schedule": "cosine", "decay_steps": 1000}),
    "chunkflow-dp2-tp2-zero2-selective": _rc(
        devices=4, schedule={"policy": "chunkflow", "chunk_size": 256, "chunkflow_k": 2,
                             "micro_batch_tokens": 512},
        parallel={"dp": 2, "tp": 2, "zero_stage": 2},
        checkpointing={"policy": "selective", "fraction": 0.5}, precision={"dtype": "bf16"},
        kernels={"loss": "fused"}),
    "padmax-cpu-one-rank": _rc(
        device="cpu", schedule={"policy": "pad-max", "micro_batch_size": 4},
        optimizer={"grad_clip": None, "lr": 3e-4}, seed=7),
    "sorted-dp2-pp2-zero1-gpipe": _rc(
        devices=4, schedule={"policy": "sorted", "micro_batch_size": 2},
        parallel={"dp": 2, "pp": 2, "zero_stage": 1, "pp_schedule": "gpipe"},
        checkpointing={"policy": "selective", "fraction": 0.25}),
    "skrull-two-nodes-adaptive": _rc(
        devices=2, nodes=2, gbt=8192, schedule={"policy": "skrull", "micro_batch_tokens": 2048},
        parallel={"dp": 4, "zero_stage": 2}, precision={"dtype": "bf16"},
        checkpointing={"policy": "adaptive", "memory_budget_gb": 20.0},
        kernels={"attention": "blocked"}),
    "pack-dp2-zero2-step-compile-varlen": _rc(
        devices=2, schedule={"policy": "pack", "micro_batch_tokens": 1024},
        parallel={"dp": 2, "zero_stage": 2, "grad_reduce": "step"}, precision={"dtype": "bf16"},
        kernels={"attention": "varlen"}, compile="blocks"),
}


def runconfig(name: str) -> RunConfig:
    return RunConfig.model_validate(copy.deepcopy(CASES[name]))


def facts_of(rc: RunConfig, *, runconfig_path: Path = JOB_PATH) -> Facts:
    dataset = load_dataset(rc.workload.data, rc.workload.model.resolve())
    return Facts.of(rc, dataset, runconfig_path=runconfig_path)

