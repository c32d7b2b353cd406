"""The baseline configs every run measures: what a user gets without tuning.

Each is a policy with the settings its own paper or trainer uses by default, so that the
tuned config is always compared with what people actually run.
"""

from __future__ import annotations

from autotune.config import RunConfig, Workload

__all__ = ["baseline_configs"]


def _rc(workload: Workload, **schedule: object) -> RunConfig:
    # Pure data parallelism over the workload's devices: the layout every trainer offers.
    return RunConfig.model_validate({"workload": workload, "schedule": schedule,
                                     "parallel": {"dp": workload.world_size}})


def baseline_configs(workload: Workload, *, include_pad_max: bool = False) -> list[RunConfig]:
    """pad-batch (the Hugging Face Trainer's default), sorted, pack (TRL bfd), Skrull, and
    ChunkFlow at a quarter and a half of the longest sequence, data-parallel over the
    workload's devices.

    ``pad-max`` (Megatron-style fixed length) costs tens of times the others on long-tail
    data; it is left out of tuning runs and measured by the benchmark suites.
    """
    max_len = workload.data.max_len
    gbt = workload.budget.global_batch_tokens
    mbt = min(max(512, max_len), gbt)
    configs = []
    if include_pad_max:
        configs.append(_rc(workload, policy="pad-max", micro_batch_size=8))
    configs += [
        _rc(workload, policy="pad-batch", micro_batch_size=8),
        _rc(workload, policy="sorted", micro_batch_size=8),
        _rc(workload, policy="pack", micro_batch_tokens=mbt),
        _rc(workload, policy="skrull", micro_batch_tokens=mbt),
    ]
    for chunk in sorted({max(64, max_len // 4), max(64, max_len // 2)}):
        configs.append(_rc(workload, policy="chunkflow", chunk_size=chunk,
                           micro_batch_tokens=chunk, chunkflow_k=1))
    return configs
