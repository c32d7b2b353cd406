"""The configuration contract: Workload, RunConfig and SearchSpace, YAML in and out."""

from autotune.config._load import WORKLOAD_PRESETS, load_workload
from autotune.config._model import MODEL_PRESETS, ModelDims, ModelSpec
from autotune.config._runconfig import (
    PADDED_POLICIES,
    POLICIES,
    POLICY_KNOBS,
    SCHEDULE_KNOBS,
    CheckpointConfig,
    KernelsConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    ScheduleConfig,
    rule_violations,
)
from autotune.config._space import SearchSpace
from autotune.config._workload import DATA_PRESETS, BudgetSpec, DataSpec, HardwareSpec, Workload
from autotune.config._yaml import dump_yaml, load_yaml, parse_config, save_yaml

__all__ = [
    "DATA_PRESETS", "MODEL_PRESETS", "PADDED_POLICIES", "POLICIES", "POLICY_KNOBS",
    "SCHEDULE_KNOBS", "BudgetSpec", "CheckpointConfig", "DataSpec", "HardwareSpec",
    "KernelsConfig", "ModelDims", "ModelSpec", "OptimizerConfig", "ParallelConfig",
    "PrecisionConfig", "RunConfig", "ScheduleConfig", "SearchSpace", "WORKLOAD_PRESETS",
    "Workload", "dump_yaml", "load_workload", "load_yaml", "parse_config", "rule_violations",
    "save_yaml",
]
