"""Scheduling policies: one interface, one file per family of policies."""

import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np

from autotune.config import ModelDims, RunConfig
from autotune.data.plan import MicroBatch, StepPlan
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
    "SortedPad", "StepBatch", "arrival_order_split", "balanced_split", "best_fit_decreasing",
    "make_policy", "plan_step", "step_plans", "timed_plans",
]


def make_policy(rc: RunConfig, dims: ModelDims, *, data_max_len: int) -> SchedulingPolicy:
    schedule = rc.schedule
    if rc.parallel.cp > 1:  # a micro-batch is spread over the cp ranks of its group
        schedule = schedule.model_copy(update={
            "micro_batch_tokens": schedule.micro_batch_tokens * rc.parallel.cp})
    return POLICY_CLASSES[schedule.policy](schedule, dims, data_max_len=data_max_len)


@dataclass
class StepBatch:
    """One global batch: its sequences (indices into the data) and one plan per
    data-parallel rank, with the seconds planning took."""

    ids: np.ndarray
    ranks: list[StepPlan]
    plan_s: float = 0.0


def plan_step(policy: SchedulingPolicy, lengths: np.ndarray, ids: np.ndarray, dp: int, *,
              lockstep: bool = False) -> StepBatch:
    """The plans of global batch ``ids``; with ``lockstep``, every rank padded with empty
    micro-batches to the busiest rank's count (sharded parameters are gathered, and
    pipeline peers exchange, once per micro-batch, so every rank must run as many)."""
    t0 = time.perf_counter()
    plans = policy.plan_ranks(lengths[ids], dp)
    if lockstep:
        most = max(p.n_micro for p in plans)
        for p in plans:
            p.units += [MicroBatch(())] * (most - p.n_micro)
    return StepBatch(ids, plans, time.perf_counter() - t0)


def step_plans(rc: RunConfig, lengths: np.ndarray, dims: ModelDims, *, start: int = 0,
               lockstep: bool = False) -> Iterator[StepBatch]:
    """Every step's global batch and per-rank plans under ``rc``, from step ``start`` on
    (the earlier batches drawn, not planned), forever: the one walk over the steps that the
    trainer runs, the step model prices and kernel tuning reads."""
    from autotune.data.batching import global_batches

    policy = make_policy(rc, dims, data_max_len=int(lengths.max()))
    stream = global_batches(lengths, global_batch_tokens=rc.workload.budget.global_batch_tokens,
                            seed=rc.seed)
    for _ in range(start):
        next(stream)
    for ids in stream:
        yield plan_step(policy, lengths, ids, rc.parallel.dp, lockstep=lockstep)


def timed_plans(rc: RunConfig, lengths: np.ndarray, dims: ModelDims, *, warmup: int,
                steps: int) -> list[tuple[np.ndarray, list[StepPlan]]]:
    """The global batches ``autotune measure`` times (the trainer's seeded stream after
    ``warmup`` steps), each with its plan per data-parallel rank, as the trainer plans them
    (before its lockstep padding passes)."""
    return [(b.ids, b.ranks) for b in islice(step_plans(rc, lengths, dims, start=warmup), steps)]
