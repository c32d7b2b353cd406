"""Every export read by its target's own code (the ``export-check`` extra installs them):
the target must accept the file and read back the values autotune meant, and, as a control,
reject a broken copy, so that a validator which accepts anything cannot pass."""

from __future__ import annotations

import importlib
import json
import os
import shlex
from pathlib import Path

import pytest
import yaml
from export_cases import CASES, facts_of, runconfig

from autotune.export import export_runconfig

CASE_NAMES = sorted(CASES)


def _need(module: str, reason: str):  # noqa: ANN202
    """The export-check package's module: `make test` installs them all, so there (it sets
    AUTOTUNE_REQUIRE_EXPORT_CHECK) a missing one fails the test; elsewhere it skips, saying
    what to install."""
    if os.environ.get("AUTOTUNE_REQUIRE_EXPORT_CHECK") == "1":
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"{reason}, yet make test installs it: {exc}")
    return pytest.importorskip(module, reason=reason)


def _export(case: str, fmt: str) -> str | None:
    rc = runconfig(case)
    return export_runconfig(rc, fmt, facts_of(rc)).text


# ---- DeepSpeed ----------------------------------------------------------------------------

class _PipelineTopology:
    """What DeepSpeed's pipeline engine hands its config (``PipelineModule.mpu()``): the batch
    rule then counts data-parallel ranks. Elsewhere, AutoTP included, it counts every rank."""

    def __init__(self, dp: int) -> None:
        self.dp = dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp


def _deepspeed_config(cfg: dict, rc, monkeypatch: pytest.MonkeyPatch):
    ds_config = _need("deepspeed.runtime.config",
                                    reason="deepspeed is not installed (pip install "
                                           "'varlen-autotune[export-check]')")
    # No process group here: the config asks deepspeed.comm for the world, as under a launcher.
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size",
                        lambda *a, **k: rc.parallel.world_size)
    mpu = _PipelineTopology(rc.parallel.dp) if rc.parallel.pp > 1 else None
    return ds_config.DeepSpeedConfig(cfg, mpu=mpu)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_deepspeed_reads_the_config(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rc = runconfig(case)
    cfg = json.loads(_export(case, "deepspeed"))
    ds = _deepspeed_config(cfg, rc, monkeypatch)
    p = rc.parallel
    assert ds.train_micro_batch_size_per_gpu == cfg["train_micro_batch_size_per_gpu"]
    assert ds.gradient_accumulation_steps == cfg["gradient_accumulation_steps"]
    ranks = p.dp if p.pp > 1 else p.world_size
    assert ds.train_batch_size == cfg.get("train_batch_size", ds.train_batch_size) == (
        ds.train_micro_batch_size_per_gpu * ds.gradient_accumulation_steps * ranks)
    assert ds.zero_optimization_stage == p.zero_stage
    assert ds.bfloat16_config.enabled == (rc.precision.dtype == "bf16")
    assert ds.gradient_clipping == (rc.optimizer.grad_clip or 0.0)
    assert ds.optimizer_name == "adamw"
    assert ds.optimizer_params["lr"] == rc.optimizer.lr
    layers = rc.checkpointing.checkpointed_layers(rc.workload.model.resolve().layers)
    if layers:
        assert ds.activation_checkpointing_config.number_checkpoints == layers
    o = rc.optimizer
    if o.lr_schedule == "cosine":
        assert ds.scheduler_name == "WarmupCosineLR"
        assert (ds.scheduler_params["total_num_steps"], ds.scheduler_params["cos_min_ratio"],
                ds.scheduler_params["warmup_num_steps"]) == (
            o.decay_steps, o.min_lr_ratio, o.warmup_steps)
    elif o.warmup_steps > 1:
        assert ds.scheduler_name == "WarmupLR"
        assert ds.scheduler_params["warmup_num_steps"] == o.warmup_steps
    assert ds.pipeline["stages"] == (p.pp if p.pp > 1 else "auto")
    assert ds.tensor_parallel_config.autotp_size == (p.tp if p.tp > 1 else 0)


def test_deepspeed_rejects_a_broken_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    case = "pack-dp4-zero3-full-bf16"
    cfg = json.loads(_export(case, "deepspeed"))
    cfg["train_batch_size"] += 1
    with pytest.raises(AssertionError, match="train_batch_size"):
        _deepspeed_config(cfg, runconfig(case), monkeypatch)


# ---- Accelerate ---------------------------------------------------------------------------

def _accelerate_load(path: Path):
    config_args = _need("accelerate.commands.config.config_args",
                                      reason="accelerate is not installed (pip install "
                                             "'varlen-autotune[export-check]')")
    return config_args.load_config_from_file(str(path))


@pytest.mark.parametrize("case", [c for c in CASE_NAMES if "pp2" not in c])
def test_accelerate_reads_the_config(case: str, tmp_path: Path) -> None:
    rc = runconfig(case)
    path = tmp_path / "accelerate.yaml"
    path.write_text(_export(case, "accelerate"))
    cfg = _accelerate_load(path)
    hw = rc.workload.hardware
    assert (cfg.num_processes, cfg.num_machines, cfg.use_cpu) == (
        hw.world_size, hw.nodes, hw.device == "cpu")
    assert cfg.mixed_precision == ("bf16" if rc.precision.dtype == "bf16" else "no")
    if cfg.distributed_type.value == "FSDP":
        assert cfg.fsdp_config["fsdp_reshard_after_forward"] == (rc.parallel.zero_stage == 3)
    _accelerate_launch_args(path, rc)


def _accelerate_launch_args(path: Path, rc) -> None:
    """``accelerate launch`` merges the file into its arguments and checks them together."""
    launch = _need("accelerate.commands.launch", reason="accelerate is not installed")
    args = launch.launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = launch._validate_launch_command(args)
    assert args.num_processes == rc.workload.hardware.world_size
    assert args.num_machines == rc.workload.hardware.nodes


def test_accelerate_rejects_an_unknown_key(tmp_path: Path) -> None:
    cfg = yaml.safe_load(_export("padmax-cpu-one-rank", "accelerate"))
    cfg["num_gpus"] = 2
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="unknown keys"):
        _accelerate_load(path)


# ---- TRL ----------------------------------------------------------------------------------

def _trl():
    return _need("trl", reason="trl is not installed (pip install "
                                             "'varlen-autotune[export-check]')")


# The export keeps the name every Transformers that TRL 1.x accepts (>= 4.56) knows; 5.x
# calls it a deprecated alias of activation_checkpointing.
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("case", [c for c in CASE_NAMES if "pp2" not in c])
def test_trl_reads_the_config(case: str, tmp_path: Path) -> None:
    trl = _trl()
    from trl import TrlParser

    rc = runconfig(case)
    text = _export(case, "trl")
    kwargs = yaml.safe_load(text)
    # use_cpu: TrainingArguments refuses bf16 without a bf16-capable GPU otherwise.
    direct = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)
    path = tmp_path / "sft.yaml"
    path.write_text(text)
    # `trl sft --config FILE`: the file becomes the parser's defaults, unknown keys refused.
    (parsed,) = TrlParser((trl.SFTConfig,)).parse_args_and_config(
        args=["--config", str(path), "--output_dir", str(tmp_path), "--use_cpu", "true"])
    for key, value in kwargs.items():
        assert getattr(direct, key) == getattr(parsed, key) == value, key
    strategies = trl.SFTConfig.__dataclass_fields__["packing_strategy"].metadata["choices"]
    assert parsed.packing_strategy in strategies
    assert parsed.bf16 == (rc.precision.dtype == "bf16")
    if rc.optimizer.lr_schedule == "cosine":
        assert parsed.lr_scheduler_type == "cosine_with_min_lr"
        assert parsed.lr_scheduler_kwargs == {"min_lr_rate": rc.optimizer.min_lr_ratio}


def test_trl_rejects_an_unknown_key(tmp_path: Path) -> None:
    trl = _trl()
    kwargs = yaml.safe_load(_export("pack-dp4-zero3-full-bf16", "trl"))
    kwargs["pack_strategy"] = kwargs.pop("packing_strategy")
    with pytest.raises(TypeError, match="pack_strategy"):
        trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)


# ---- Megatron-Core ------------------------------------------------------------------------

# Megatron-LM flags whose destination is not the core config field of the same name
# (megatron/training/arguments.py: core_transformer_config_from_args).
_MEGATRON_RENAMED = {"norm_epsilon": "layernorm_epsilon", "swiglu": "gated_linear_unit"}
_MEGATRON_INVERTED = {"disable_bias_linear": "add_bias_linear"}
# Flags only Megatron-LM's own parser reads (data, schedule, model construction): the
# megatron-core wheel has no parser for them, so the golden files pin them instead.
_MEGATRON_LM_ONLY = {
    "micro_batch_size", "global_batch_size", "seq_length", "reset_position_ids",
    "reset_attention_mask", "use_torch_fsdp2", "lr_decay_style", "lr_warmup_iters", "seed",
    "lr_decay_iters",
    "max_position_embeddings", "position_embedding_type", "rotary_base",
    "untie_embeddings_and_output_weights", "group_query_attention"}


def _megatron_args(text: str) -> dict:
    args: dict = {}
    for line in text.splitlines():
        flag, *value = shlex.split(line)
        name = flag.removeprefix("--").replace("-", "_")
        args[name] = True if not value else _number(value[0])
    return args


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _core_configs(args: dict) -> tuple:
    """TransformerConfig, OptimizerConfig and DistributedDataParallelConfig built from the
    flags as Megatron-LM builds them: every flag whose name is a field of the config."""
    _need("megatron.core", reason="megatron-core is not installed (pip install "
                                                "'varlen-autotune[export-check]')")
    import dataclasses

    import torch
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    values = {_MEGATRON_RENAMED.get(k, k): v for k, v in args.items()}
    values |= {new: not args[old] for old, new in _MEGATRON_INVERTED.items() if old in args}
    values["attention_backend"] = AttnBackend[args["attention_backend"]]
    if args.get("swiglu"):
        values["activation_func"] = F.silu
    if not args.get("group_query_attention"):
        values.pop("num_query_groups", None)
    # As arguments.py: parameters (and pipeline messages) in the training dtype.
    values["params_dtype"] = values["pipeline_dtype"] = (
        torch.bfloat16 if args.get("bf16") else torch.float32)
    built, used = [], set()
    for cls in (TransformerConfig, OptimizerConfig, DistributedDataParallelConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        built.append(cls(**{k: v for k, v in values.items() if k in names}))
        used |= names
    stray = set(args) - used - _MEGATRON_LM_ONLY - set(_MEGATRON_RENAMED) - set(_MEGATRON_INVERTED)
    assert not stray, f"flags no config reads: {sorted(stray)}"
    return tuple(built)


# megatron-core 0.16 warns about its own default cuda_graph_scope on every config.
@pytest.mark.filterwarnings("ignore:full scope is deprecated:UserWarning")
@pytest.mark.parametrize("case", CASE_NAMES)
def test_megatron_core_accepts_the_arguments(case: str) -> None:
    rc = runconfig(case)
    args = _megatron_args(_export(case, "megatron"))
    cfg, opt, ddp = _core_configs(args)
    p = rc.parallel
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
            cfg.context_parallel_size) == (p.tp, p.pp, p.cp)
    assert cfg.sequence_parallel == (p.tp > 1)
    assert cfg.bf16 == opt.bf16 == (rc.precision.dtype == "bf16")
    assert cfg.recompute_granularity == (None if rc.checkpointing.policy == "none" else "full")
    assert (opt.lr, opt.adam_beta2, opt.clip_grad) == (
        rc.optimizer.lr, rc.optimizer.beta2, rc.optimizer.grad_clip or 0.0)
    assert ddp.use_distributed_optimizer == (p.dp > 1 and p.zero_stage in (1, 2))
    # Megatron-LM's own batch rule (arguments.py): whole micro-batches on every dp rank.
    assert args["global_batch_size"] % (args["micro_batch_size"] * p.dp) == 0


@pytest.mark.filterwarnings("ignore:full scope is deprecated:UserWarning")
def test_megatron_core_rejects_tp_that_does_not_divide_heads() -> None:
    args = _megatron_args(_export("chunkflow-dp2-tp2-zero2-selective", "megatron"))
    args["tensor_model_parallel_size"] = 3
    with pytest.raises(ValueError, match="num_attention_heads"):
        _core_configs(args)


# ---- torchtitan ---------------------------------------------------------------------------

def _torchtitan_job(args: list[str]):
    _need("torchtitan", reason="torchtitan is not installed (pip install "
                                             "'varlen-autotune[export-check]')")
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(args)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_torchtitan_reads_the_config(case: str, tmp_path: Path) -> None:
    rc = runconfig(case)
    text = _export(case, "torchtitan")
    path = tmp_path / "job.toml"
    path.write_text(text)
    job = _torchtitan_job(["--job.config_file", str(path)])
    p, t, par = rc.parallel, job.training, job.parallelism
    assert (par.tensor_parallel_degree, par.pipeline_parallel_degree,
            par.context_parallel_degree) == (p.tp, p.pp, p.cp)
    assert par.data_parallel_replicate_degree * par.data_parallel_shard_degree == p.dp
    assert par.fsdp_reshard_after_forward == ("always" if p.zero_stage == 3 else "never")
    assert job.activation_checkpoint.mode == {"none": "none", "full": "full"}.get(
        rc.checkpointing.policy, "selective")
    assert (job.optimizer.lr, job.optimizer.beta2, job.debug.seed) == (
        rc.optimizer.lr, rc.optimizer.beta2, rc.seed)
    assert t.mixed_precision_param == ("bfloat16" if rc.precision.dtype == "bf16" else "float32")
    o, sched = rc.optimizer, job.lr_scheduler
    assert sched.warmup_steps == o.warmup_steps
    if o.lr_schedule == "cosine":
        assert (sched.decay_type, sched.decay_ratio, sched.total_steps, sched.min_lr_factor) == (
            "cosine", None, o.decay_steps, o.min_lr_ratio)
    else:
        assert sched.decay_ratio == 0.0
    assert job.compile.enable == (rc.compile == "blocks")
    if rc.compile == "blocks":
        assert job.compile.components == ["model"]
    # torchtitan's own batch rule (train.py): whole local batches on every dp rank.
    assert t.global_batch_size % (t.local_batch_size * p.dp) == 0
    # The overrides in the header name the same settings: parsed alone, they give them too.
    overrides = shlex.split(text.splitlines()[2].removeprefix("# "))
    alone = _torchtitan_job(overrides)
    for section in ("training", "parallelism", "lr_scheduler", "debug"):
        assert getattr(alone, section) == getattr(job, section), section


def test_torchtitan_rejects_an_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(_export("padmax-cpu-one-rank", "torchtitan").replace(
        "[training]\n", "[training]\nlocal_batch = 3\n"))
    with pytest.raises(ValueError, match="local_batch"):
        _torchtitan_job(["--job.config_file", str(path)])


def test_a_missing_export_check_package_fails_under_make_test(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOTUNE_REQUIRE_EXPORT_CHECK", "1")
    with pytest.raises(pytest.fail.Exception, match="yet make test installs it"):
        _need("no_such_export_target_module", reason="it is not installed")
    monkeypatch.delenv("AUTOTUNE_REQUIRE_EXPORT_CHECK")
    with pytest.raises(pytest.skip.Exception, match="it is not installed"):
        _need("no_such_export_target_module", reason="it is not installed")
