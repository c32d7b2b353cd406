"""What every exporter derives from a RunConfig and its data, and how token budgets become
the row counts that other trainers batch by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autotune.config import ModelDims, RunConfig
from autotune.data import Dataset, global_batches

__all__ = [
    "Facts", "RowBatch", "global_batch_note", "rows_of_sequences", "rows_of_tokens",
    "sequences_per_step",
]


@dataclass(frozen=True, kw_only=True)
class Facts:
    """Numbers a target needs that the RunConfig holds only implicitly.

    ``seq_len`` is the longest sequence of the workload's data, what autotune's pad-max pads
    to (for a synthetic preset at most ``data.max_len``). Not the model's ``max_seq_len``:
    that is the context limit, often far above the data, and padding to it would spend
    memory the tuned config never spent.
    ``sequences_per_step`` is the mean number of sequences in autotune's own global batches
    (cut at ``global_batch_tokens`` real tokens) over a pass of the data.
    """

    dims: ModelDims
    seq_len: int
    mean_len: float
    sequences_per_step: float
    runconfig_path: Path | None = None

    @classmethod
    def of(cls, rc: RunConfig, dataset: Dataset, *, runconfig_path: Path | None = None) -> Facts:
        lengths = dataset.lengths
        per_step = sequences_per_step(lengths, seed=rc.seed,
                                      global_batch_tokens=rc.workload.budget.global_batch_tokens)
        return cls(dims=rc.workload.model.resolve(),
                   seq_len=dataset.max_len,
                   mean_len=float(np.mean(lengths)), sequences_per_step=per_step,
                   runconfig_path=runconfig_path)


# Steps averaged at least: with few steps per pass of the data, one pass gives a mean that
# jumps as the budget crosses a sequence boundary, and round trips through it drift.
_MIN_STEPS = 32


def sequences_per_step(lengths: np.ndarray, *, global_batch_tokens: int, seed: int) -> float:
    """Mean sequences in autotune's global batches over a pass of the data (and at least
    32 steps, reshuffled per pass as in training)."""
    batches = global_batches(lengths, global_batch_tokens=global_batch_tokens, seed=seed)
    counts: list[int] = []
    seen = 0
    while seen < len(lengths) or len(counts) < _MIN_STEPS:
        counts.append(len(next(batches)))
        seen += counts[-1]
    return float(np.mean(counts))


@dataclass(frozen=True)
class RowBatch:
    """A fixed batch in rows (sequences, or packs of ``row_len`` tokens): ``micro`` rows per
    micro-batch per data-parallel rank, ``accumulation`` micro-batches per step."""

    micro: int
    accumulation: int
    dp: int
    row_len: int

    @property
    def global_rows(self) -> int:
        return self.micro * self.accumulation * self.dp


def rows_of_sequences(rc: RunConfig, facts: Facts, *, micro: int) -> RowBatch:
    """Rows are whole sequences: the step keeps autotune's mean sequences per step, to the
    nearest whole number of micro-batches on every rank."""
    dp = rc.parallel.dp
    acc = max(1, round(facts.sequences_per_step / (micro * dp)))
    return RowBatch(micro, acc, dp, facts.seq_len)


def rows_of_tokens(rc: RunConfig, *, row_len: int, micro: int = 1) -> RowBatch:
    """Rows are full windows of ``row_len`` tokens (concatenated or packed data): the step
    keeps ``global_batch_tokens``, to the nearest whole number of micro-batches per rank."""
    dp = rc.parallel.dp
    acc = max(1, round(rc.workload.budget.global_batch_tokens / (row_len * micro * dp)))
    return RowBatch(micro, acc, dp, row_len)


def global_batch_note(rc: RunConfig, facts: Facts, rows: RowBatch, *, what: str,
                      fill: str = "") -> tuple[str, str]:
    """The substitute and the reason for carrying ``global_batch_tokens`` as ``rows`` of
    ``what``; ``fill`` says how full a row of tokens is."""
    gbt = rc.workload.budget.global_batch_tokens
    sub = (f"{rows.global_rows} {what} a step = {rows.micro} per micro-batch x "
           f"{rows.accumulation} accumulation x {rows.dp} data-parallel")
    if what == "sequences":
        why = (f"batches by sequences, not tokens: autotune's global batches of {gbt} tokens "
               f"hold {facts.sequences_per_step:.1f} sequences on average over the data "
               f"(mean length {facts.mean_len:.0f}), so about "
               f"{rows.global_rows * facts.mean_len:.0f} tokens a step")
    else:
        why = (f"batches by rows, not tokens: {gbt} tokens a step, rounded to whole "
               f"micro-batches on every rank, is {rows.global_rows * rows.row_len} tokens "
               f"{fill}".rstrip())
    return sub, why
