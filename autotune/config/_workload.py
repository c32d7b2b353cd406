"""The workload: model x data x hardware x budget."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from autotune.config._model import ModelSpec

__all__ = ["DATA_PRESETS", "BudgetSpec", "DataSpec", "HardwareSpec", "Workload"]

DATA_PRESETS = ("longsft", "bimodal", "fixed")
# A synthetic preset holds every sequence in memory: past this it cannot be drawn on any
# machine, so 10**10 is refused here instead of failing to allocate.
MAX_SEQUENCES = 10**7


class DataSpec(BaseModel):
    """A synthetic preset (deterministic by seed) or a local file of sequences or lengths."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = None
    path: str | None = None
    num_sequences: PositiveInt = Field(512, le=MAX_SEQUENCES)
    max_len: PositiveInt = 2048
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.preset is None) == (self.path is None):
            raise ValueError("give exactly one of: preset, path")
        if self.preset is not None and self.preset not in DATA_PRESETS:
            raise ValueError(f"unknown data preset {self.preset!r}; choose from {list(DATA_PRESETS)}")
        return self

    def label(self) -> str:
        return self.preset if self.preset is not None else self.path.rsplit("/", 1)[-1]


class HardwareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Literal["cpu", "cuda"] = "cpu"
    devices_per_node: PositiveInt = 1
    nodes: PositiveInt = 1
    device_name: str | None = Field(None, description="datasheet name, e.g. H100-SXM, for peak FLOP/s")
    cpu_threads: PositiveInt | None = Field(None, description="intra-op threads per CPU rank")

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.nodes


class BudgetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    global_batch_tokens: PositiveInt = 8192
    memory_cap_gb: float = Field(8.0, gt=0)
    trials: PositiveInt = 20

    @model_validator(mode="before")
    @classmethod
    def _no_time_s(cls, data: object) -> object:
        # budget.time_s was never read (`autotune run --budget-s` bounds the measuring); the
        # tables recorded while it existed hold it as null, which still loads
        if isinstance(data, dict) and "time_s" in data:
            if data["time_s"] is not None:
                raise ValueError("budget.time_s is not a budget any command reads; use "
                                 "`autotune run --budget-s`")
            data = {k: v for k, v in data.items() if k != "time_s"}
        return data


class Workload(BaseModel):
    """What is to be trained, on what, within which limits."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(default_factory=lambda: ModelSpec(preset="llama-tiny"))
    data: DataSpec = Field(default_factory=lambda: DataSpec(preset="longsft"))
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)

    @property
    def world_size(self) -> int:
        return self.hardware.world_size
