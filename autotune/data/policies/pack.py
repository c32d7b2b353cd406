"""Padding-free packing: best-fit-decreasing into micro-batches of a token budget."""

from __future__ import annotations

import numpy as np

from autotune.data.plan import MicroBatch, Segment, StepPlan
from autotune.data.policies._base import ComputeBalanced, SchedulingPolicy, best_fit_decreasing

__all__ = ["Pack"]


class Pack(ComputeBalanced, SchedulingPolicy):
    """TRL's ``bfd`` packing without truncation: sequences keep their own attention and
    positions inside a pack; a sequence above the budget travels alone. Across data-parallel
    ranks the global batch is split by estimated compute first."""

    name = "pack"

    def plan(self, lengths: np.ndarray) -> StepPlan:
        bins, _ = best_fit_decreasing(lengths, self.schedule.micro_batch_tokens)
        return StepPlan([MicroBatch(tuple(Segment(i, 0, int(lengths[i]), int(lengths[i]))
                                          for i in sorted(b))) for b in bins])
