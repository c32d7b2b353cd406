"""Scheduling policies: one interface, one file per family of policies."""

from autotune.config import ModelDims, RunConfig
from autotune.data.policies._base import (
    POLICY_CLASSES,
    SchedulingPolicy,
    arrival_order_split,
    balanced_split,
    best_fit_decreasing,
)
from autotune.data.policies.chunkflow import ChunkFlow
from autotune.data.policies.pack import Pack
from autotune.data.policies.padding import PadBatch, PadMax, SortedPad
from autotune.data.policies.skrull import Skrull

__all__ = [
    "POLICY_CLASSES", "ChunkFlow", "Pack", "PadBatch", "PadMax", "SchedulingPolicy", "Skrull",
    "SortedPad", "arrival_order_split", "balanced_split", "best_fit_decreasing", "make_policy",
]


def make_policy(rc: RunConfig, dims: ModelDims, *, data_max_len: int) -> SchedulingPolicy:
    return POLICY_CLASSES[rc.schedule.policy](rc.schedule, dims, data_max_len=data_max_len)
