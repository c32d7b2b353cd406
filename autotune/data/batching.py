"""The stream of global batches: every policy trains on the same sequences in each step."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["global_batches"]


def global_batches(lengths: np.ndarray, *, global_batch_tokens: int,
                   seed: int) -> Iterator[np.ndarray]:
    """Indices of the sequences of each step, in arrival order, forever.

    Each epoch visits the data in a fresh seeded permutation; a global batch takes sequences
    in that order while their real tokens (padding excluded) fit ``global_batch_tokens``.
    A sequence longer than the budget forms a batch of its own.
    """
    if len(lengths) == 0:
        raise ValueError("no sequences to batch")
    epoch = 0
    batch: list[int] = []
    used = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
        for i in order:
            n = int(lengths[i])
            if batch and used + n > global_batch_tokens:
                yield np.asarray(batch, dtype=np.int64)
                batch, used = [], 0
            batch.append(int(i))
            used += n
        epoch += 1
