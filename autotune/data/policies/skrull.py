"""Skrull-style scheduling: balance estimated compute, not tokens, under a token cap."""

from __future__ import annotations

import math

import numpy as np

from autotune.data.cost import sequence_flops
from autotune.data.plan import MicroBatch, Segment, StepPlan
from autotune.data.policies._base import ComputeBalanced, SchedulingPolicy

__all__ = ["Skrull"]


class Skrull(ComputeBalanced, SchedulingPolicy):
    """Longest sequence first onto the least-loaded micro-batch (by estimated FLOPs, linear
    plus quadratic attention term) that has token room under ``micro_batch_tokens``.

    It opens as few micro-batches as the tokens need and more only when nothing fits, so
    equal-token packs with unequal attention work (the sum of s_i^2, not (sum s_i)^2) come
    out balanced in compute while memory stays under the cap. Across data-parallel ranks the
    sequences are first dealt by the same estimate, longest first onto the least-loaded rank.
    """

    name = "skrull"

    def plan(self, lengths: np.ndarray) -> StepPlan:
        cap = self.schedule.micro_batch_tokens
        cost = sequence_flops(lengths, self.dims)
        n_bins = max(1, math.ceil(int(lengths.sum()) / cap))
        members: list[list[int]] = [[] for _ in range(n_bins)]
        tokens = [0] * n_bins
        load = [0.0] * n_bins
        for i in np.argsort(-lengths, kind="stable"):
            n = int(lengths[i])
            fits = [b for b in range(len(members)) if tokens[b] + n <= cap]
            if fits:
                b = min(fits, key=load.__getitem__)
            else:
                b = len(members)
                members.append([])
                tokens.append(0)
                load.append(0.0)
            members[b].append(int(i))
            tokens[b] += n
            load[b] += float(cost[i])
        return StepPlan([MicroBatch(tuple(Segment(i, 0, int(lengths[i]), int(lengths[i]))
                                          for i in sorted(m))) for m in members if m])
