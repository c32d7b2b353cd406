"""The step model's table of a config's plans: the priced steps' plans per data-parallel
rank, each unit of work reduced to the numbers pricing and memory counting read."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from autotune.data.plan import ChunkGroup, StepPlan

__all__ = ["PlanTable", "heaviest_steps", "unit_rows"]


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
