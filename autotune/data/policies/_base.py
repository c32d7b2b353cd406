"""The one interface every scheduling policy implements."""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from autotune.config import ModelDims, ScheduleConfig
from autotune.data.cost import sequence_flops
from autotune.data.plan import ChunkGroup, MicroBatch, Segment, StepPlan

__all__ = [
    "POLICY_CLASSES", "ComputeBalanced", "SchedulingPolicy", "arrival_order_split",
    "balanced_split", "best_fit_decreasing",
]

POLICY_CLASSES: dict[str, type[SchedulingPolicy]] = {}


class SchedulingPolicy(ABC):
    """Turns the sequences of one global batch into micro-batches.

    ``plan`` receives the lengths of the global batch's sequences in arrival order and
    returns a StepPlan whose segments refer to them by position. Every real token appears in
    exactly one segment, so every policy trains on the same tokens; only the grouping, the
    padding and (for chunkflow) the splitting differ. Planning is pure bookkeeping on
    lengths: it must cost well under 1% of a step.
    """

    name: ClassVar[str]

    def __init__(self, schedule: ScheduleConfig, dims: ModelDims, *, data_max_len: int):
        self.schedule = schedule
        self.dims = dims
        self.data_max_len = data_max_len

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            POLICY_CLASSES[cls.name] = cls

    @abstractmethod
    def plan(self, lengths: np.ndarray) -> StepPlan:
        """The micro-batches of one step."""

    def split(self, lengths: np.ndarray, ranks: int) -> list[np.ndarray]:
        """Which sequences each data-parallel rank trains on: by default the arrival-order
        split of a distributed sampler (rank r takes sequences r, r + ranks, ...)."""
        return arrival_order_split(len(lengths), ranks)

    def sequence_cost(self, lengths: np.ndarray) -> np.ndarray:
        """Estimated compute per sequence, for balancing ranks."""
        return sequence_flops(lengths, self.dims)

    def plan_ranks(self, lengths: np.ndarray, ranks: int) -> list[StepPlan]:
        """One plan per data-parallel rank; segments refer to positions in ``lengths``."""
        if ranks == 1:
            return [self.plan(lengths)]
        how = self.schedule.rank_split
        if how == "arrival":
            parts = arrival_order_split(len(lengths), ranks)
        elif how == "balanced":
            parts = balanced_split(self.sequence_cost(lengths), ranks)
        else:
            parts = self.split(lengths, ranks)
        plans = []
        for idx in parts:
            plans.append(_remap(self.plan(lengths[idx]), idx) if len(idx) else StepPlan())
        return plans


def best_fit_decreasing(sizes: np.ndarray, capacity: int,
                        free: list[int] | None = None) -> tuple[list[list[int]], list[int]]:
    """Pack items into bins of ``capacity``: largest first, each into the fullest bin that
    still has room, a new bin when none has.

    ``free`` gives the remaining room of bins that exist already (they are filled first and
    keep their positions at the front of the result). Returns the item indices per bin and
    the room left in each. An item larger than ``capacity`` gets a bin of its own.
    """
    bins: list[list[int]] = [[] for _ in free or []]
    room: list[int] = list(free or [])
    open_bins = sorted((r, b) for b, r in enumerate(room))  # (room, bin) ascending
    for i in np.argsort(-np.asarray(sizes), kind="stable"):
        size = int(sizes[i])
        k = bisect.bisect_left(open_bins, (size, -1))
        if k < len(open_bins):
            r, b = open_bins.pop(k)
        else:
            b, r = len(bins), max(capacity, size)
            bins.append([])
            room.append(r)
        bins[b].append(int(i))
        room[b] = r - size
        bisect.insort(open_bins, (room[b], b))
    return bins, room


def arrival_order_split(n: int, ranks: int) -> list[np.ndarray]:
    return [np.arange(r, n, ranks) for r in range(ranks)]


def balanced_split(costs: np.ndarray, ranks: int) -> list[np.ndarray]:
    """Longest-processing-time first: the most expensive sequence goes to the rank with the
    least estimated work so far. Within 4/3 of optimal, and close to the mean when no single
    sequence dominates; ties break by rank so the split is deterministic."""
    import heapq

    heap = [(0.0, r) for r in range(ranks)]  # (load, rank): the least loaded, lowest rank first
    members: list[list[int]] = [[] for _ in range(ranks)]
    for i in np.argsort(-np.asarray(costs), kind="stable"):
        load, r = heapq.heappop(heap)
        members[r].append(int(i))
        heapq.heappush(heap, (load + float(costs[i]), r))
    return [np.asarray(sorted(m), dtype=np.int64) for m in members]


def _remap(plan: StepPlan, idx: np.ndarray) -> StepPlan:
    def seg(s: Segment) -> Segment:
        return Segment(int(idx[s.seq]), s.start, s.length, s.padded)

    def mb(m: MicroBatch) -> MicroBatch:
        return MicroBatch(tuple(seg(s) for s in m.segments))

    return StepPlan([ChunkGroup(tuple(mb(c) for c in u.chunks), u.keep)
                     if isinstance(u, ChunkGroup) else mb(u) for u in plan.units])


class ComputeBalanced:
    """Mixin: split the global batch across ranks by estimated compute, not by count."""

    def split(self, lengths: np.ndarray, ranks: int) -> list[np.ndarray]:
        return balanced_split(self.sequence_cost(lengths), ranks)
