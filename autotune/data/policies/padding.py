"""The padding baselines: a fixed number of sequences per micro-batch, padded."""

from __future__ import annotations

import numpy as np

from autotune.data.plan import MicroBatch, Segment, StepPlan
from autotune.data.policies._base import SchedulingPolicy

__all__ = ["PadBatch", "PadMax", "SortedPad"]


class _Padded(SchedulingPolicy):
    def _order(self, lengths: np.ndarray) -> np.ndarray:
        return np.arange(len(lengths))

    def _pad_to(self, group_lengths: np.ndarray) -> int:
        return int(group_lengths.max())

    def plan(self, lengths: np.ndarray) -> StepPlan:
        mbs = self.schedule.micro_batch_size
        order = self._order(lengths)
        units = []
        for lo in range(0, len(order), mbs):
            idx = order[lo:lo + mbs]
            pad = self._pad_to(lengths[idx])
            units.append(MicroBatch(tuple(Segment(int(i), 0, int(lengths[i]), pad) for i in idx)))
        return StepPlan(units)


class PadMax(_Padded):
    """Every sequence padded to the data's maximum length: the fixed-length baseline of
    Megatron-style trainers."""

    name = "pad-max"

    def _pad_to(self, group_lengths: np.ndarray) -> int:
        return self.data_max_len


class PadBatch(_Padded):
    """Arrival order, each micro-batch padded to its longest sequence: the Hugging Face
    Trainer's default collation."""

    name = "pad-batch"


class SortedPad(_Padded):
    """As pad-batch after sorting the global batch by length, so neighbours pad little."""

    name = "sorted"

    def _order(self, lengths: np.ndarray) -> np.ndarray:
        return np.argsort(-lengths, kind="stable")

    def split(self, lengths: np.ndarray, ranks: int) -> list[np.ndarray]:
        # Dealt round-robin after sorting, so every rank gets a similar spread of lengths.
        order = self._order(lengths)
        return [np.sort(order[r::ranks]) for r in range(ranks)]
