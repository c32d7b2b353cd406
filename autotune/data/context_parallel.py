"""Where each sequence of a micro-batch runs across the ``cp`` ranks of a context-parallel
group: sharded (split into 2 x cp pieces, rank i holding pieces i and 2cp-1-i, so that every
rank gets an equal share of the causal attention's work) or local (whole, on one rank).

Placements (``schedule.cp_placement``):

- ``all``: every sequence sharded (one shorter than 2 x cp tokens cannot be, and stays whole);
- ``none``: every sequence local, the ranks balanced by estimated compute;
- ``dacp`` (Skrull's Distribution-Aware Context Parallelism): sequences longer than one
  rank's token budget are sharded (they would not fit), the rest kept whole, longest first
  on the least-loaded rank; then, while it lowers the slowest rank's load, the longest whole
  sequence of the busiest rank is sharded instead. A sequence's cost counts its linear work
  and its quadratic attention; sharding adds what it costs per token and per sequence
  (``shard_cost``: the key/value all-gather and the pieces' extra kernels).

The placement is a pure function of the micro-batch, so every rank of the group computes
the same one without communicating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from autotune.data.plan import MicroBatch, Segment

if TYPE_CHECKING:
    from autotune.config import ModelDims, RunConfig

__all__ = ["CPShare", "Placer", "Sharded", "pieces", "place", "shard_cost"]

# What sharding a sequence costs beyond its share of the work, in the placement's units (one
# token's linear work, forward and backward).
# cpu: measured (``python -m suites.context_parallel``, part 3: cp=2 all-sharded against
# none-sharded on fixed lengths 256 and 2048, llama-tiny fp32, 2 gloo ranks on the 2-vCPU
# development host): a + b L per sequence with b = 0.27 of a token's work (the gather, the
# per-piece attention and the gathered keys' indexing and its backward) and a = 44 tokens.
# cuda: nothing measured; the gather's bytes at H100's bf16 GEMM rate (989 TFLOP/s x 0.815,
# cost_models/data/gpu) over NVLink4's ring bus bandwidth of 370 GB/s (collectives.csv), and
# per sequence and layer the pieces' ~40 kernels at the 4.3 us launch floor the GPU prior
# uses (cost_models/data/gpu/SOURCES.md).
CPU_SHARD_COST = (0.27, 44.0)
_GPU_FLOPS = 989e12 * 0.815
_GPU_GATHER_BYTES_PER_S = 370e9
_GPU_KERNELS_PER_PIECE_LAYER = 40
_GPU_LAUNCH_S = 4.3e-6


@dataclass(frozen=True)
class Sharded:
    """A sequence split across the group: its segment and the 2 x cp piece boundaries."""

    segment: Segment
    bounds: tuple[int, ...]  # 2 cp + 1 offsets into the segment's real tokens

    def held(self, rank: int, cp: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(start, end) of the two pieces rank ``rank`` holds, in the segment's tokens."""
        j = 2 * cp - 1 - rank
        return (self.bounds[rank], self.bounds[rank + 1]), (self.bounds[j], self.bounds[j + 1])


@dataclass(frozen=True)
class CPShare:
    """What one rank of the group runs of a micro-batch."""

    local: tuple[Segment, ...]  # whole sequences
    sharded: tuple[Sharded, ...]  # every sharded sequence of the micro-batch (all ranks hold a part)

    def tokens(self, rank: int, cp: int) -> int:
        own = sum(s.padded for s in self.local)
        for sh in self.sharded:
            (a, b), (c, d) = sh.held(rank, cp)
            own += (b - a) + (d - c)
        return own


def pieces(length: int, cp: int) -> tuple[int, ...]:
    """Boundaries of 2 x cp pieces as equal as can be (the first ones one token longer)."""
    n = 2 * cp
    sizes = np.full(n, length // n, dtype=np.int64)
    sizes[:length % n] += 1
    return tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)]))


def _cost(length: np.ndarray | int, hidden: int) -> np.ndarray | float:
    # Linear work (projections, MLP) against causal attention's pairs: per token 24 h^2
    # against 2 L h FLOPs a layer (forward), so the quadratic term weighs L / (12 h).
    return np.asarray(length, float) * (1.0 + np.asarray(length, float) / (12.0 * hidden))


def shard_cost(dims: ModelDims, *, tp: int, act_bytes: int, device: str) -> tuple[float, float]:
    """(per token, per sequence) that sharding adds, in units of one token's linear work
    (the forward and backward matmuls of a layer, sharded over tp alike). On GPUs: the
    keys' and values' all-gather and the backward reduction of their gradients, and the
    pieces' kernel launches; on CPUs, as measured (``CPU_SHARD_COST``)."""
    if device == "cpu":
        return CPU_SHARD_COST
    token_s = 3 * 2 * dims.matmul_params_per_layer() / tp / _GPU_FLOPS
    moved = 2 * (2 * dims.kv_width // tp * act_bytes)  # keys and values, there and back
    return (moved / _GPU_GATHER_BYTES_PER_S / token_s,
            _GPU_KERNELS_PER_PIECE_LAYER * _GPU_LAUNCH_S / token_s)


@dataclass(frozen=True)
class Placer:
    """The placement of a RunConfig: what the trainer, the step model and the suites run."""

    cp: int
    placement: str
    hidden: int
    rank_tokens: int
    cost: tuple[float, float]  # shard_cost

    @classmethod
    def of(cls, rc: RunConfig, dims: ModelDims) -> Placer:
        return cls(rc.parallel.cp, rc.schedule.cp_placement, dims.hidden,
                   rc.schedule.micro_batch_tokens,
                   shard_cost(dims, tp=rc.parallel.tp, act_bytes=rc.precision.itemsize,
                              device=rc.workload.hardware.device))

    def __call__(self, mb: MicroBatch) -> list[CPShare]:
        return place(mb, self.cp, self.placement, hidden=self.hidden,
                     rank_tokens=self.rank_tokens, shard_cost=self.cost)


def place(mb: MicroBatch, cp: int, placement: str, *, hidden: int, rank_tokens: int,
          shard_cost: tuple[float, float]) -> list[CPShare]:
    """One share per rank of the group. ``rank_tokens``: the most tokens one rank may run
    (a longer sequence is sharded whatever the placement, except ``none``, which refuses);
    ``shard_cost``: what sharding adds per token and per sequence, in the cost's units (one
    token's linear work; ``shard_cost``)."""
    segs = list(mb.segments)
    if cp == 1:
        return [CPShare(tuple(segs), ())]
    for seg in segs:
        if seg.padded != seg.length:
            raise ValueError("context parallelism shards packed (unpadded) sequences only")
    cost = [float(_cost(s.length, hidden)) for s in segs]
    if placement == "all":
        shard = [s.length >= 2 * cp for s in segs]  # a shorter one cannot be split
    else:
        shard = [s.length > rank_tokens for s in segs]
        if placement == "none" and any(shard):
            n = max(s.length for s in segs)
            raise ValueError(f"a sequence of {n} tokens exceeds one rank's {rank_tokens} and "
                             f"cp_placement none keeps it whole")
    for i, s in enumerate(segs):
        if shard[i] and s.length < 2 * cp:
            raise ValueError(f"a sequence of {s.length} tokens cannot be split into "
                             f"2 x cp = {2 * cp} pieces")

    def assign() -> tuple[np.ndarray, list[list[int]]]:
        """The sharded sequences' share on every rank, then the rest longest first onto
        the least-loaded rank."""
        per_token, per_seq = shard_cost
        load = np.full(cp, sum(cost[i] / cp + segs[i].length / cp * per_token + per_seq
                               for i in range(len(segs)) if shard[i]))
        owners: list[list[int]] = [[] for _ in range(cp)]
        for i in sorted((i for i in range(len(segs)) if not shard[i]),
                        key=lambda i: (-segs[i].length, i)):
            r = int(np.argmin(load))
            owners[r].append(i)
            load[r] += cost[i]
        return load, owners

    load, owners = assign()
    while placement == "dacp":
        # shard the longest whole sequence of the busiest rank while that lowers the
        # slowest rank's load (the gather's cost included)
        busiest = owners[int(np.argmax(load))]
        cands = [i for i in busiest if segs[i].length >= 2 * cp]
        if not cands:
            break
        i = max(cands, key=lambda i: (segs[i].length, -i))
        shard[i] = True
        trial, trial_owners = assign()
        if trial.max() < load.max():
            load, owners = trial, trial_owners
        else:
            shard[i] = False
            break
    sharded = tuple(Sharded(segs[i], pieces(segs[i].length, cp))
                    for i in sorted((i for i in range(len(segs)) if shard[i]),
                                    key=lambda i: segs[i].seq))
    return [CPShare(tuple(sorted((segs[i] for i in own), key=lambda s: s.seq)), sharded)
            for own in owners]
