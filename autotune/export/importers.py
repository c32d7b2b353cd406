"""Importers: a user's DeepSpeed or Accelerate config as a RunConfig, so that the setup they
run today can be measured and used as a baseline.

Neither format says how sequences become batches: an import schedules like the Hugging
Face Trainer's default collation (``pad-batch``, each micro-batch padded to its longest
sequence). Every setting that has no RunConfig equivalent is named in the notes with the
value chosen instead; a key the importer does not know, or a value autotune cannot run
(offloading, context parallelism, an "auto" the Trainer would fill in), is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autotune.config import RunConfig, Workload, parse_config
from autotune.data import load_dataset
from autotune.errors import UserError
from autotune.export._facts import sequences_per_step

__all__ = ["IMPORTERS", "Imported", "import_accelerate", "import_deepspeed"]

# DeepSpeed keys that change nothing autotune measures: logging, profiling, monitors.
_DS_PASSIVE = frozenset({
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "tensorboard",
    "wandb", "csv_monitor", "comet", "comms_logger", "flops_profiler",
    "zero_allow_untested_optimizer", "checkpoint"})
_DS_READ = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "bf16", "fp16", "zero_optimization", "optimizer", "scheduler",
    "activation_checkpointing", "tensor_parallel", "pipeline"})
# ZeRO's communication tuning: autotune's FSDP2 sizes its own collectives.
_ZERO_TUNING = frozenset({
    "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
    "reduce_scatter", "allgather_partitions", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_max_live_parameters",
    "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
    "round_robin_gradients", "sub_group_size", "load_from_fp32_weights",
    "ignore_unused_parameters"})
# Adam's numerics autotune leaves at torch.optim.AdamW's defaults.
_ADAM_PASSIVE = frozenset({"eps", "adam_w_mode", "torch_adam", "bias_correction", "amsgrad"})
# How DeepSpeed cuts and feeds a pipeline, not whether there is one.
_PIPE_PASSIVE = frozenset({"partition", "seed_layers", "activation_checkpoint_interval",
                           "pipe_partitioned", "grad_partitioned"})
_ACCELERATE_PASSIVE = frozenset({
    "compute_environment", "debug", "machine_rank", "main_process_ip", "main_process_port",
    "rdzv_backend", "same_network", "main_training_function", "enable_cpu_affinity",
    "gpu_ids", "downcast_bf16", "tpu_env", "tpu_use_cluster", "tpu_use_sudo", "dynamo_config"})
_ACCELERATE_READ = frozenset({
    "distributed_type", "mixed_precision", "use_cpu", "num_processes", "num_machines",
    "fsdp_config", "deepspeed_config", "parallelism_config"})
_FSDP_PASSIVE = frozenset({
    "fsdp_version", "fsdp_auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap",
    "fsdp_state_dict_type", "fsdp_cpu_ram_efficient_loading", "fsdp_sync_module_states",
    "fsdp_use_orig_params", "fsdp_forward_prefetch", "fsdp_backward_prefetch",
    "fsdp_min_num_params"})


@dataclass
class Imported:
    """The RunConfig read from a file, and what had no equivalent (one line each)."""

    runconfig: RunConfig
    notes: list[str] = field(default_factory=list)


@dataclass
class _Draft:
    """RunConfig sections being filled from a file, and the notes on what was not carried."""

    source: str
    workload: dict[str, Any]
    schedule: dict[str, Any] = field(default_factory=lambda: {"policy": "pad-batch"})
    parallel: dict[str, Any] = field(default_factory=dict)
    checkpointing: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def fail(self, where: str, problem: str) -> UserError:
        return UserError(f"{self.source}: {where}: {problem}")

    def runconfig(self) -> RunConfig:
        data = {"workload": self.workload, "schedule": self.schedule, "parallel": self.parallel,
                "checkpointing": self.checkpointing, "precision": self.precision,
                "optimizer": self.optimizer}
        return parse_config(RunConfig, data, source=self.source)


def _check_keys(d: _Draft, section: dict[str, Any], where: str, *, read: frozenset[str],
                passive: frozenset[str]) -> None:
    for key in section:
        if key not in read | passive:
            raise d.fail(f"{where}{key}", "unknown key (autotune imports "
                         f"{', '.join(sorted(read))}; ignores {', '.join(sorted(passive))})")
    ignored = sorted(k for k in section if k in passive)
    if ignored:
        d.notes.append(f"{where or 'top level'}: {', '.join(ignored)}: not carried (nothing "
                       f"autotune measures depends on them)")


def _number(d: _Draft, cfg: dict[str, Any], key: str, kind: type = int) -> Any:
    value = cfg.get(key)
    if value is None:
        return None
    if value == "auto":
        raise d.fail(key, "is 'auto', which the Hugging Face Trainer fills in at run time; "
                     "give the number it runs with")
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            kind is int and value != int(value)):
        raise d.fail(key, f"expected {'an integer' if kind is int else 'a number'}, "
                     f"got {value!r}")
    return kind(value)


def _section(d: _Draft, cfg: dict[str, Any], key: str) -> dict[str, Any]:
    value = cfg.get(key, {})
    if not isinstance(value, dict):
        raise d.fail(key, f"expected a mapping, got {value!r}")
    return value


def _read_file(path: Path, kind: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if kind == "json" else yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                        f"{exc.msg})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: YAML syntax error{where}: "
                        f"{getattr(exc, 'problem', None) or exc}") from None


def _mapping(path: Path, kind: str) -> dict[str, Any]:
    data = _read_file(path, kind)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, got "
                        f"{type(data).__name__}")
    return data


# ---- DeepSpeed -----------------------------------------------------------------------------

def import_deepspeed(path: str | Path, workload: Workload) -> Imported:
    """A DeepSpeed JSON config on ``workload`` (whose hardware gives the world size)."""
    path = Path(path)
    cfg = _mapping(path, "json")
    d = _Draft(str(path), workload.model_dump(mode="json", exclude_none=True))
    _check_keys(d, cfg, "", read=_DS_READ, passive=_DS_PASSIVE)
    _ds_into(d, cfg, workload)
    return Imported(d.runconfig(), d.notes)


def _ds_into(d: _Draft, cfg: dict[str, Any], workload: Workload) -> None:
    """Fill ``d`` from a DeepSpeed config; ``workload``'s devices give the world size."""
    tensor = _section(d, cfg, "tensor_parallel")
    _check_keys(d, tensor, "tensor_parallel.", read=frozenset({"autotp_size"}),
                passive=frozenset())
    tp = _number(d, tensor, "autotp_size") or 1
    pipeline = _section(d, cfg, "pipeline")
    _check_keys(d, pipeline, "pipeline.", read=frozenset({"stages"}), passive=_PIPE_PASSIVE)
    pp = _number(d, pipeline, "stages") if pipeline.get("stages", "auto") != "auto" else 1
    world = workload.world_size
    if world % (tp * pp):
        raise d.fail("tensor_parallel/pipeline", f"tp={tp} x pp={pp} does not divide the "
                     f"workload's {world} devices")
    dp = world // (tp * pp)
    zero = _section(d, cfg, "zero_optimization")
    _check_keys(d, zero, "zero_optimization.", read=frozenset({"stage", "offload_optimizer",
                                                               "offload_param"}),
                passive=_ZERO_TUNING)
    for offload in ("offload_optimizer", "offload_param"):
        device = _section(d, zero, offload).get("device", "none")
        if device != "none":
            raise d.fail(f"zero_optimization.{offload}", f"offloading to {device!r} has no "
                         f"RunConfig equivalent (autotune keeps state on the devices)")
    d.parallel |= {"dp": dp, "tp": tp, "pp": pp,
                   "zero_stage": _number(d, zero, "stage") or 0}
    # The pipeline engine gives DeepSpeed's batch rule the data-parallel ranks; elsewhere,
    # AutoTP included, the rule counts every rank.
    _ds_batch(d, cfg, dp, dp if pp > 1 else dp * tp)
    _ds_precision(d, cfg)
    _ds_optimizer(d, cfg)
    _ds_checkpointing(d, cfg)


def _ds_batch(d: _Draft, cfg: dict[str, Any], dp: int, ranks: int) -> None:
    """DeepSpeed's own rule: train_batch_size = micro x accumulation x ``ranks``; of the
    three, any one or two give the rest (accumulation 1 when it cannot be derived). The
    global batch is micro x accumulation x ``dp`` sequences."""
    train, micro, acc = (_number(d, cfg, k) for k in (
        "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
    if train is None and micro is None:
        raise d.fail("train_batch_size", "give train_batch_size or "
                     "train_micro_batch_size_per_gpu (DeepSpeed needs one of them)")
    if micro is None:
        acc = acc or 1
        micro = train // (ranks * acc)
    elif acc is None:
        acc = train // (micro * ranks) if train is not None else 1
    train = micro * acc * ranks if train is None else train
    if not micro or not acc or train != micro * acc * ranks:
        raise d.fail("train_batch_size", f"{train} is not train_micro_batch_size_per_gpu "
                     f"{micro} x gradient_accumulation_steps {acc} x {ranks} ranks as "
                     f"DeepSpeed counts them (all, or the data-parallel ones under a "
                     f"pipeline); give --workload with the devices the config runs on")
    sequences = micro * acc * dp
    d.schedule["micro_batch_size"] = micro
    d.workload["budget"]["global_batch_tokens"] = _tokens_for(d, sequences)
    d.notes.append(f"global batch of {sequences} sequences: global_batch_tokens="
                   f"{d.workload['budget']['global_batch_tokens']}, the smallest token budget "
                   f"whose global batches hold {sequences} sequences on average over the data")


def _tokens_for(d: _Draft, sequences: int) -> int:
    """Smallest global batch in tokens whose batches hold ``sequences`` on average."""
    workload = parse_config(Workload, d.workload, source=d.source)
    lengths = load_dataset(workload.data, workload.model.resolve()).lengths
    # Batches of that many of the longest sequences always hold enough: the upper bound.
    lo, hi = 1, sequences * int(lengths.max())
    while lo < hi:
        mid = (lo + hi) // 2
        # seed 0: the seed an imported RunConfig trains with
        if sequences_per_step(lengths, global_batch_tokens=mid, seed=0) >= sequences:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _ds_precision(d: _Draft, cfg: dict[str, Any]) -> None:
    bf16, fp16 = (_section(d, cfg, k).get("enabled", False) for k in ("bf16", "fp16"))
    if "auto" in (bf16, fp16):
        raise d.fail("bf16/fp16", "enabled is 'auto', which the Hugging Face Trainer fills "
                     "in at run time; give true or false")
    if fp16:
        d.notes.append("fp16.enabled=true: nearest: precision.dtype=bf16 (autotune trains in "
                       "fp32 or bf16)")
    d.precision["dtype"] = "bf16" if bf16 or fp16 else "fp32"


def _ds_optimizer(d: _Draft, cfg: dict[str, Any]) -> None:
    d.optimizer["grad_clip"] = _number(d, cfg, "gradient_clipping", float) or None
    opt = _section(d, cfg, "optimizer")
    _check_keys(d, opt, "optimizer.", read=frozenset({"type", "params"}), passive=frozenset())
    kind = str(opt.get("type", "AdamW"))
    if kind.lower() not in ("adam", "adamw"):
        d.notes.append(f"optimizer.type={kind}: nearest: AdamW (autotune's trainer runs AdamW)")
    params = _section(d, opt, "params")
    _check_keys(d, params, "optimizer.params.", read=frozenset({"lr", "betas", "weight_decay"}),
                passive=_ADAM_PASSIVE)
    for key, name in (("lr", "lr"), ("weight_decay", "weight_decay")):
        if _number(d, params, key, float) is not None:
            d.optimizer[name] = _number(d, params, key, float)
    betas = params.get("betas")
    if betas is not None:
        if not (isinstance(betas, list) and len(betas) == 2):
            raise d.fail("optimizer.params.betas", f"expected two numbers, got {betas!r}")
        d.optimizer |= {"beta1": float(betas[0]), "beta2": float(betas[1])}
    sched = _section(d, cfg, "scheduler")
    _check_keys(d, sched, "scheduler.", read=frozenset({"type", "params"}), passive=frozenset())
    if sched:
        params = _section(d, sched, "params")
        warm = _number(d, params, "warmup_num_steps") or 0
        d.optimizer["warmup_steps"] = warm
        if sched.get("type") == "WarmupCosineLR" and _number(d, params, "total_num_steps"):
            d.optimizer |= {"lr_schedule": "cosine",
                            "decay_steps": _number(d, params, "total_num_steps"),
                            "min_lr_ratio": _number(d, params, "cos_min_ratio", float) or 0.0}
        elif sched.get("type") != "WarmupLR":
            d.notes.append(f"scheduler.type={sched.get('type')}: nearest: linear warm-up over "
                           f"{warm} steps, then a constant rate (autotune's schedule)")


def _ds_checkpointing(d: _Draft, cfg: dict[str, Any]) -> None:
    if "activation_checkpointing" not in cfg:
        d.checkpointing["policy"] = "none"
        return
    section = _section(d, cfg, "activation_checkpointing")
    layers = parse_config(Workload, d.workload, source=d.source).model.resolve().layers
    count = _number(d, section, "number_checkpoints")
    if count is None or count >= layers:
        d.checkpointing["policy"] = "full"
    elif count == 0:
        d.checkpointing["policy"] = "none"
    else:
        d.checkpointing |= {"policy": "selective", "fraction": count / layers}
    extras = sorted(k for k, v in section.items() if k != "number_checkpoints" and v)
    if extras:
        d.notes.append(f"activation_checkpointing: {', '.join(extras)}: not carried (autotune "
                       f"keeps checkpointed activations on the device, unpartitioned)")


# ---- Accelerate ----------------------------------------------------------------------------

def import_accelerate(path: str | Path, workload: Workload) -> Imported:
    """An Accelerate config YAML on ``workload``'s model, data and budget; the config's
    processes and machines replace the workload's hardware."""
    path = Path(path)
    cfg = _mapping(path, "yaml")
    d = _Draft(str(path), workload.model_dump(mode="json", exclude_none=True))
    _check_keys(d, cfg, "", read=_ACCELERATE_READ, passive=_ACCELERATE_PASSIVE)
    procs = _number(d, cfg, "num_processes") or 1
    machines = _number(d, cfg, "num_machines") or 1
    if procs % machines:
        raise d.fail("num_processes", f"{procs} processes do not spread evenly over "
                     f"{machines} machines")
    kind = str(cfg.get("distributed_type", "NO"))
    cpu = bool(cfg.get("use_cpu")) or kind == "MULTI_CPU"
    d.workload["hardware"] = {**d.workload["hardware"], "device": "cpu" if cpu else "cuda",
                              "devices_per_node": procs // machines, "nodes": machines}
    tp = _accelerate_parallelism(d, cfg, procs)
    d.parallel |= {"dp": procs // tp, "tp": tp}
    mp = str(cfg.get("mixed_precision", "no"))
    if mp not in ("no", "bf16"):
        d.notes.append(f"mixed_precision={mp}: nearest: precision.dtype=bf16")
    d.precision["dtype"] = "fp32" if mp == "no" else "bf16"
    if kind == "FSDP":
        _fsdp_into(d, _section(d, cfg, "fsdp_config"))
    elif kind == "DEEPSPEED":
        _accelerate_deepspeed(d, _section(d, cfg, "deepspeed_config"), path.parent)
    elif kind in ("NO", "MULTI_GPU", "MULTI_CPU"):
        d.parallel["zero_stage"] = 0
    else:
        raise d.fail("distributed_type", f"{kind!r} has no RunConfig equivalent (autotune "
                     f"runs NO, MULTI_GPU, MULTI_CPU, FSDP or DEEPSPEED)")
    d.notes.append(f"schedule: pad-batch with micro_batch_size="
                   f"{d.schedule.get('micro_batch_size', 8)} (an Accelerate config carries no "
                   f"batch sizes; set schedule.micro_batch_size to the script's)")
    return Imported(d.runconfig(), d.notes)


def _accelerate_parallelism(d: _Draft, cfg: dict[str, Any], procs: int) -> int:
    pc = _section(d, cfg, "parallelism_config")
    prefix = "parallelism_config_"
    known = frozenset(prefix + k for k in ("dp_replicate_size", "dp_shard_size", "tp_size",
                                           "cp_size"))
    _check_keys(d, pc, "parallelism_config.", read=known, passive=frozenset())
    if (_number(d, pc, prefix + "cp_size") or 1) > 1:
        raise d.fail("parallelism_config.cp_size", "context parallelism is not read from "
                     "Accelerate configs yet; set parallel.cp in the RunConfig")
    tp = _number(d, pc, prefix + "tp_size") or 1
    dp = (_number(d, pc, prefix + "dp_replicate_size") or 1) * (
        _number(d, pc, prefix + "dp_shard_size") or procs // tp)
    if procs % tp or dp * tp != procs:
        raise d.fail("parallelism_config", f"dp {dp} x tp {tp} is not the {procs} processes")
    return tp


def _fsdp_into(d: _Draft, fsdp: dict[str, Any]) -> None:
    read = frozenset({"fsdp_reshard_after_forward", "fsdp_sharding_strategy",
                      "fsdp_activation_checkpointing", "fsdp_offload_params"})
    _check_keys(d, fsdp, "fsdp_config.", read=read, passive=_FSDP_PASSIVE)
    if fsdp.get("fsdp_offload_params"):
        raise d.fail("fsdp_config.fsdp_offload_params", "offloading parameters has no "
                     "RunConfig equivalent (autotune keeps state on the devices)")
    strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD"))
    reshard = fsdp.get("fsdp_reshard_after_forward", strategy)
    # FSDP1 names its strategies; FSDP2 has the one flag (true: FULL_SHARD's resharding).
    stage = {True: 3, False: 2, "FULL_SHARD": 3, "SHARD_GRAD_OP": 2, "NO_SHARD": 0,
             "HYBRID_SHARD": 3, "HYBRID_SHARD_ZERO2": 2}.get(reshard)
    if stage is None:
        raise d.fail("fsdp_config", f"sharding {reshard!r} is not one autotune knows")
    if str(reshard).startswith("HYBRID"):
        d.notes.append(f"fsdp_sharding_strategy={reshard}: nearest: zero_stage={stage} over "
                       f"all ranks (autotune shards over the whole data-parallel group)")
    d.parallel["zero_stage"] = stage
    d.checkpointing["policy"] = "full" if fsdp.get("fsdp_activation_checkpointing") else "none"


def _accelerate_deepspeed(d: _Draft, ds: dict[str, Any], base: Path) -> None:
    read = frozenset({"zero_stage", "gradient_accumulation_steps", "gradient_clipping",
                      "offload_optimizer_device", "offload_param_device", "deepspeed_config_file"})
    _check_keys(d, ds, "deepspeed_config.", read=read,
                passive=frozenset({"zero3_init_flag", "zero3_save_16bit_model",
                                   "deepspeed_multinode_launcher"}))
    if "deepspeed_config_file" in ds:
        file = Path(str(ds["deepspeed_config_file"]))
        workload = parse_config(Workload, d.workload, source=d.source)
        inner = import_deepspeed(file if file.is_absolute() else base / file, workload)
        rc = inner.runconfig
        d.schedule = rc.schedule.model_dump(mode="json")
        d.workload = rc.workload.model_dump(mode="json", exclude_none=True)
        for name in ("parallel", "checkpointing", "precision", "optimizer"):
            setattr(d, name, getattr(rc, name).model_dump(mode="json"))
        d.notes += inner.notes
        return
    for offload in ("offload_optimizer_device", "offload_param_device"):
        if ds.get(offload, "none") != "none":
            raise d.fail(f"deepspeed_config.{offload}", f"offloading to {ds[offload]!r} has "
                         f"no RunConfig equivalent (autotune keeps state on the devices)")
    d.parallel["zero_stage"] = _number(d, ds, "zero_stage") or 0
    if "gradient_clipping" in ds:
        d.optimizer["grad_clip"] = _number(d, ds, "gradient_clipping", float) or None
    if "gradient_accumulation_steps" in ds:
        d.notes.append("deepspeed_config.gradient_accumulation_steps: not carried (the "
                       "micro-batch size it multiplies is in the script)")


IMPORTERS = {"deepspeed": import_deepspeed, "accelerate": import_accelerate}
