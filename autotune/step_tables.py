"""The step model's table of a config's plans: the priced steps' plans per data-parallel
rank, each unit of work reduced to the numbers pricing and memory counting read."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from autotune.data.context_parallel import Placer
from autotune.data.plan import ChunkGroup, StepPlan

__all__ = ["CPMicroBatch", "PlanTable", "cp_micro_batches", "heaviest_steps", "unit_rows"]


@dataclass
class PlanTable:
    """One workload + schedule + dp: the sampled steps' plans per data-parallel rank."""

    steps: list[list[StepPlan]]  # [step][dp rank]
    real_tokens: np.ndarray  # per step, all ranks
    units: list[list[np.ndarray]]  # [step][rank] -> unit rows (see unit_rows)
    padded: np.ndarray  # [step, rank] padded tokens
    micro_batches: np.ndarray  # [step, rank]
    longest: np.ndarray  # [step, rank] longest real segment
    entries: list | None = None  # [step][rank] -> (signature ids, forward-again flags)
    cp: list | None = None  # [step][rank] -> the busiest cp rank's CPMicroBatch per micro-batch
    cp_gathered: np.ndarray | None = None  # [step, rank] sharded tokens all-gathered
    cp_gathers: np.ndarray | None = None  # [step, rank] micro-batches that gather


def unit_rows(plan: StepPlan) -> np.ndarray:
    """Per unit of work (a micro-batch, or a ChunkFlow group): tokens that keep activations,
    their attention pairs, the tokens one recompute rematerializes, the key/value prefix,
    and the tokens of the widest logits."""
    out = []
    for unit in plan.units:
        if isinstance(unit, ChunkGroup):
            kept = unit.chunks[len(unit.chunks) - unit.keep:]
            widest = max(c.tokens for c in unit.chunks)
            kept_tokens = sum(c.tokens for c in kept)
            pairs = sum(c.attention_pairs for c in kept)
            prefix = sum(c.segments[0].length for c in unit.chunks[:-1])
            out.append((max(kept_tokens, widest), pairs, widest, prefix, widest))
        else:
            out.append((unit.tokens, unit.attention_pairs, unit.tokens, 0, unit.tokens))
    return np.array(out, dtype=float).reshape(-1, 5)


def heaviest_steps(plans: PlanTable) -> Iterator[tuple[int, int, np.ndarray]]:
    """(step, rank, unit rows) of each data-parallel rank's heaviest priced step, as
    ``autotune measure`` would meet its peak; ranks without work are skipped."""
    for r in range(len(plans.steps[0])):
        s = max(range(len(plans.steps)), key=lambda i: (plans.longest[i, r], plans.padded[i, r]))
        if len(plans.units[s][r]):
            yield s, r, plans.units[s][r]


@dataclass(frozen=True)
class CPMicroBatch:
    """A micro-batch under context parallelism, as its busiest rank runs it: its tokens,
    its attention as causal segments (whole sequences, and per sharded sequence the length
    whose causal pairs equal its query pieces' pairs against the whole sequence), and the
    sharded tokens whose keys and values the group all-gathers."""

    tokens: int
    seqlens: tuple[int, ...]
    pairs: float
    gathered: int

    @property
    def signature(self) -> tuple[int, tuple[int, ...], int]:
        return self.tokens, self.seqlens, 0


def cp_micro_batches(plan: StepPlan, placer: Placer) -> list[CPMicroBatch]:
    """Each micro-batch of ``plan`` placed over the cp group (``placer``), seen from its
    busiest rank."""
    cp, hidden = placer.cp, placer.hidden
    out = []
    for mb in plan.micro_batches():
        shares = placer(mb)
        gathered = sum(sh.segment.length for sh in shares[0].sharded)
        views = []
        for r, share in enumerate(shares):
            seqlens = [s.length for s in share.local]
            pairs = sum(n * (n + 1) / 2 for n in seqlens)
            for sh in share.sharded:
                p = sum((b * (b + 1) - a * (a + 1)) / 2 for a, b in sh.held(r, cp))
                pairs += p
                seqlens.append(max(1, round((math.sqrt(1 + 8 * p) - 1) / 2)))
            views.append(CPMicroBatch(share.tokens(r, cp), tuple(seqlens), pairs, gathered))
        out.append(max(views, key=lambda v: (v.tokens + v.pairs / (6 * hidden), v.pairs)))
    return out
