"""Scheduling policies: one interface, one file per family of policies."""

import numpy as np

from autotune.config import ModelDims, RunConfig
from autotune.data.plan import StepPlan
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
    "timed_plans",
]


def make_policy(rc: RunConfig, dims: ModelDims, *, data_max_len: int) -> SchedulingPolicy:
    return POLICY_CLASSES[rc.schedule.policy](rc.schedule, dims, data_max_len=data_max_len)


def timed_plans(rc: RunConfig, lengths: np.ndarray, dims: ModelDims, *, warmup: int,
                steps: int) -> list[tuple[np.ndarray, list[StepPlan]]]:
    """The global batches ``autotune measure`` times (the trainer's seeded stream after
    ``warmup`` steps), each with its plan per data-parallel rank, as the trainer plans them
    (before its lockstep padding passes)."""
    from autotune.data.batching import global_batches

    policy = make_policy(rc, dims, data_max_len=int(lengths.max()))
    stream = global_batches(lengths, global_batch_tokens=rc.workload.budget.global_batch_tokens,
                            seed=rc.seed)
    for _ in range(warmup):
        next(stream)
    out = []
    for _ in range(steps):
        ids = next(stream)
        out.append((ids, policy.plan_ranks(lengths[ids], rc.parallel.dp)))
    return out
