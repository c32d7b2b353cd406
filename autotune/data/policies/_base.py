"""The one interface every scheduling policy implements."""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from autotune.config import ModelDims, ScheduleConfig
from autotune.data.plan import StepPlan

__all__ = ["POLICY_CLASSES", "SchedulingPolicy", "best_fit_decreasing"]

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
