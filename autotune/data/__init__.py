"""Data: sequences, length distributions, global batches and scheduling policies."""

from autotune.data.batching import global_batches
from autotune.data.dataset import Dataset, Lengths, load_dataset, load_eval_dataset, load_lengths
from autotune.data.plan import ChunkGroup, MicroBatch, Segment, StepPlan, Unit
from autotune.data.policies import (
    POLICY_CLASSES,
    SchedulingPolicy,
    StepBatch,
    make_policy,
    plan_step,
    step_plans,
    timed_plans,
)
from autotune.data.sequences import MarkovSource, SequenceSet

__all__ = [
    "POLICY_CLASSES", "ChunkGroup", "Dataset", "Lengths", "MarkovSource", "MicroBatch",
    "SchedulingPolicy", "Segment", "SequenceSet", "StepBatch", "StepPlan", "Unit",
    "global_batches", "load_dataset", "load_eval_dataset", "load_lengths", "make_policy",
    "plan_step", "step_plans", "timed_plans",
]
