"""ChunkFlow: uniform chunks, long sequences split into dependent chunks with key/value state."""

from __future__ import annotations

import numpy as np

from autotune.data.cost import sequence_flops
from autotune.data.plan import ChunkGroup, MicroBatch, Segment, StepPlan
from autotune.data.policies._base import ComputeBalanced, SchedulingPolicy, best_fit_decreasing

__all__ = ["ChunkFlow"]


class ChunkFlow(ComputeBalanced, SchedulingPolicy):
    """Sequences longer than ``chunk_size`` become a ChunkGroup of pieces of ``chunk_size``
    (the last one shorter), one piece per chunk; short sequences are packed best-fit into
    the room the pieces leave and then into new chunks of ``micro_batch_tokens``.

    Peak activation memory follows ``chunkflow_k * micro_batch_tokens`` plus the key/value
    state of one sequence, not the longest sequence.
    """

    name = "chunkflow"

    def sequence_cost(self, lengths: np.ndarray) -> np.ndarray:
        """Forward plus backward (2x) plus the forwards of recomputed chunks."""
        cs, k = self.schedule.chunk_size, self.schedule.chunkflow_k
        chunks = np.ceil(lengths / cs)
        recomputed = np.clip(chunks - k, 0, None) / chunks
        return sequence_flops(lengths, self.dims) * (3 + recomputed) / 3

    def plan(self, lengths: np.ndarray) -> StepPlan:
        cs, cap, k = (self.schedule.chunk_size, self.schedule.micro_batch_tokens,
                      self.schedule.chunkflow_k)
        pieces: list[list[Segment]] = []  # per chunk of a group: its segments so far
        group_of: list[int] = []
        long_ids = [int(i) for i in np.flatnonzero(lengths > cs)]
        for g, i in enumerate(long_ids):
            n = int(lengths[i])
            for start in range(0, n, cs):
                pieces.append([Segment(i, start, min(cs, n - start), min(cs, n - start))])
                group_of.append(g)
        short = np.flatnonzero(lengths <= cs)
        room = [cap - p[0].length for p in pieces]
        bins, _ = best_fit_decreasing(lengths[short], cap, free=room)
        chunks = [p + [Segment(int(short[j]), 0, int(lengths[short[j]]), int(lengths[short[j]]))
                       for j in sorted(b)] for p, b in zip(pieces, bins)]
        chunks += [[Segment(int(short[j]), 0, int(lengths[short[j]]), int(lengths[short[j]]))
                    for j in sorted(b)] for b in bins[len(pieces):]]
        units: list[MicroBatch | ChunkGroup] = []
        for g in range(len(long_ids)):
            members = [MicroBatch(tuple(c)) for c, gg in zip(chunks, group_of) if gg == g]
            units.append(ChunkGroup(tuple(members), keep=min(k, len(members))))
        units += [MicroBatch(tuple(c)) for c in chunks[len(pieces):]]
        return StepPlan(units)
