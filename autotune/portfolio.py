"""The baseline configs every run measures: what a user gets without tuning.

Each is a policy with the settings its own paper or trainer uses by default, so that the
tuned config is always compared with what people actually run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from autotune.config import RunConfig, Workload
from autotune.config._space import tp_degrees

__all__ = ["baseline_configs", "device_defaults", "fitting_layout", "ladder_fits", "memory_ladder"]

Fits = Callable[[RunConfig], bool]


def memory_ladder(workload: Workload) -> Iterator[dict]:
    """The layouts users reach for as a model outgrows their devices, in the order they
    reach for them: data parallelism, then ZeRO 2 and 3 (the DeepSpeed autotuner's ladder),
    then activation checkpointing, then a chunked (fused) loss, which never holds a long
    sequence's logits whole (tokens x vocab in fp32: 16 GB for 32K tokens of Llama 3), then
    tensor parallelism inside a node, then pipeline stages across nodes (both over ZeRO 3,
    full checkpointing and the fused loss)."""
    world, dims = workload.world_size, workload.model.resolve()
    for zero in (0, 2, 3):
        yield {"parallel": {"dp": world, "zero_stage": zero}, "checkpointing": {"policy": "none"}}
    for ckpt in ("selective", "full"):
        yield {"parallel": {"dp": world, "zero_stage": 3}, "checkpointing": {"policy": ckpt}}
    most = {"checkpointing": {"policy": "full"}, "kernels": {"loss": "fused"}}
    yield {"parallel": {"dp": world, "zero_stage": 3}} | most
    node, nodes = workload.hardware.devices_per_node, workload.hardware.nodes
    for tp in (d for d in tp_degrees(workload) if d > 1):
        yield {"parallel": {"dp": world // tp, "tp": tp, "zero_stage": 3}} | most
    for pp in (d for d in range(2, nodes + 1) if nodes % d == 0 and dims.layers % d == 0):
        yield {"parallel": {"dp": world // (node * pp) or 1, "tp": node, "pp": pp,
                            "zero_stage": 3}} | most


def fitting_layout(workload: Workload, base: dict, fits: Fits | None) -> RunConfig:
    """``base`` (schedule, precision, kernels, seed) on the first rung of the memory ladder
    that ``fits`` (a memory prediction), a padding policy's micro-batch halved down to one
    sequence on each rung before the next (what a user tries first: the DeepSpeed
    autotuner's largest fitting micro-batch per ZeRO stage); plain data parallelism when
    nothing is asked. Where nothing fits, the last rung tried, for the caller to refuse."""
    last = None
    for rung in memory_ladder(workload):
        for schedule in _smaller_micro_batches(base["schedule"]):
            kernels = base.get("kernels", {}) | rung.get("kernels", {})
            try:
                rc = RunConfig.model_validate({"workload": workload, **base, "schedule": schedule,
                                               **rung, "kernels": kernels})
            except ValueError:
                continue  # a rung this policy or model cannot take (chunkflow under ZeRO 3)
            if fits is None or fits(rc):
                return rc
            last = rc
    return last if last is not None else RunConfig.model_validate({"workload": workload, **base})


def ladder_fits(workload: Workload, models) -> Fits | None:  # noqa: ANN001 - StepModels
    """What decides a rung of the memory ladder: on GPUs, the step model's peak within the
    cap less the search's margin; on a CPU nothing (plain data parallelism, which the small
    CPU workloads always fit)."""
    if workload.hardware.device != "cuda":
        return None
    from autotune.predict import fits_in_memory
    from autotune.tune.strategies import MEMORY_MARGIN

    return fits_in_memory(models, margin=MEMORY_MARGIN)


def _smaller_micro_batches(schedule: dict) -> list[dict]:
    size = schedule.get("micro_batch_size")
    if size is None:
        return [schedule]
    out = []
    while size >= 1:
        out.append(schedule | {"micro_batch_size": size})
        size //= 2
    return out


def _rc(workload: Workload, fits: Fits | None, **schedule: object) -> RunConfig:
    return fitting_layout(workload, device_defaults(workload) | {"schedule": schedule}, fits)


def device_defaults(workload: Workload) -> dict:
    """What a run of this size on these devices uses besides its schedule and layout: on
    GPUs bf16 and FlashAttention; on a CPU the RunConfig's own defaults."""
    if workload.hardware.device == "cuda":
        return {"precision": {"dtype": "bf16"}, "kernels": {"attention": "varlen"}}
    return {}


def baseline_configs(workload: Workload, *, include_pad_max: bool = False,
                     fits: Fits | None = None) -> list[RunConfig]:
    """pad-batch (the Hugging Face Trainer's default), sorted, pack (TRL bfd), Skrull, and
    ChunkFlow at a quarter and a half of the longest sequence, over the workload's devices:
    pure data parallelism, or, given ``fits`` (a memory prediction), the first rung of
    ``memory_ladder`` predicted to fit, as a user would climb it. On GPUs in bf16 with
    FlashAttention.

    ``pad-max`` (Megatron-style fixed length) costs tens of times the others on long-tail
    data; it is left out of tuning runs and measured by the benchmark suites.
    """
    max_len = workload.data.max_len
    gbt = workload.budget.global_batch_tokens
    mbt = min(max(512, max_len), gbt)
    configs = []
    if include_pad_max:
        configs.append(_rc(workload, fits, policy="pad-max", micro_batch_size=8))
    configs += [
        _rc(workload, fits, policy="pad-batch", micro_batch_size=8),
        _rc(workload, fits, policy="sorted", micro_batch_size=8),
        _rc(workload, fits, policy="pack", micro_batch_tokens=mbt),
        _rc(workload, fits, policy="skrull", micro_batch_tokens=mbt),
    ]
    for chunk in sorted({max(64, max_len // 4), max(64, max_len // 2)}):
        configs.append(_rc(workload, fits, policy="chunkflow", chunk_size=chunk,
                           micro_batch_tokens=chunk, chunkflow_k=1))
    return configs
