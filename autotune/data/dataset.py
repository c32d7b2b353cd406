"""The training data of a workload: synthetic presets or a user file, checked against the model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autotune.config import DataSpec, ModelDims
from autotune.data.loaders import read_records
from autotune.data.sequences import (
    MIN_LEN,
    MarkovSource,
    SequenceSet,
    bimodal_lengths,
    fixed_lengths,
    longsft_lengths,
)
from autotune.errors import UserError

__all__ = ["Dataset", "Lengths", "load_dataset", "load_eval_dataset", "load_lengths"]

log = logging.getLogger(__name__)

_PRESET_LENGTHS = {"longsft": longsft_lengths, "bimodal": bimodal_lengths, "fixed": fixed_lengths}


@dataclass(frozen=True)
class Dataset:
    sequences: SequenceSet
    source: str
    entropy_floor: float | None  # mean true NLL of synthetic tokens (nats); None for user tokens

    @property
    def lengths(self) -> np.ndarray:
        return self.sequences.lengths

    @property
    def max_len(self) -> int:
        return int(self.lengths.max())


def _rngs(seed: int, *, held_out: bool = False) -> tuple[np.random.Generator, np.random.Generator]:
    # Children 0-1 draw the training data, 2-3 the held-out data: independent streams of
    # the same seed, so the evaluation set never repeats a training sequence's draws.
    children = np.random.SeedSequence(seed).spawn(4)
    lengths_seq, tokens_seq = children[2:] if held_out else children[:2]
    return np.random.default_rng(lengths_seq), np.random.default_rng(tokens_seq)


def _from_file(spec: DataSpec, dims: ModelDims) -> Dataset:
    path = Path(spec.path)
    records = read_records(path)
    negative = np.flatnonzero(records.lengths < 0)
    if negative.size:  # a corrupt file, not a short sequence to drop
        i = int(negative[0])
        raise UserError(f"{path}: {records.where[i]}: negative length {records.lengths[i]}")
    keep = records.lengths >= MIN_LEN
    if not keep.any():
        raise UserError(f"{path}: no sequences of at least {MIN_LEN} tokens (empty data)")
    if not keep.all():
        log.warning("%s: dropped %d sequences shorter than %d tokens", path,
                    int((~keep).sum()), MIN_LEN)
    too_long = np.flatnonzero(keep & (records.lengths > dims.max_seq_len))
    if too_long.size:
        i = int(too_long[0])
        raise UserError(f"{path}: {records.where[i]}: sequence of {records.lengths[i]} tokens "
                        f"exceeds the model's context limit max_seq_len={dims.max_seq_len}")
    idx = np.flatnonzero(keep)
    _, token_rng = _rngs(spec.seed)
    synth, floor = MarkovSource(dims.vocab, spec.seed).sample(records.lengths[idx], token_rng)
    seqs = []
    for j, i in enumerate(idx):
        ids = records.seqs[i]
        if ids is None:
            seqs.append(synth.seq(j))
            continue
        bad = (ids < 0) | (ids >= dims.vocab)
        if bad.any():
            raise UserError(f"{path}: {records.where[i]}: token id {int(ids[bad][0])} is "
                            f"outside the vocabulary [0, {dims.vocab})")
        seqs.append(ids)
    all_synthetic = all(records.seqs[i] is None for i in idx)
    return Dataset(SequenceSet.from_lists(seqs, dims.vocab), str(path),
                   floor if all_synthetic else None)


def load_dataset(spec: DataSpec, dims: ModelDims) -> Dataset:
    """The sequences a workload trains on, deterministic by ``spec.seed``."""
    if spec.path is not None:
        return _from_file(spec, dims)
    length_rng, token_rng = _rngs(spec.seed)
    lengths = _PRESET_LENGTHS[spec.preset](spec.num_sequences, spec.max_len, length_rng)
    seqs, floor = MarkovSource(dims.vocab, spec.seed).sample(lengths, token_rng)
    return Dataset(seqs, f"preset:{spec.preset}", floor)


@dataclass(frozen=True)
class Lengths:
    """A workload's sequence lengths without their tokens: all that planning and pricing
    read (a synthetic preset's tokens take seconds to draw for millions of them)."""

    lengths: np.ndarray
    source: str

    @property
    def max_len(self) -> int:
        return int(self.lengths.max())


def load_lengths(spec: DataSpec, dims: ModelDims) -> Lengths:
    """The lengths ``load_dataset`` would give, drawn from the same seeded stream."""
    if spec.path is not None:
        data = _from_file(spec, dims)
        return Lengths(data.lengths, data.source)
    length_rng, _ = _rngs(spec.seed)
    return Lengths(_PRESET_LENGTHS[spec.preset](spec.num_sequences, spec.max_len, length_rng),
                   f"preset:{spec.preset}")


def load_eval_dataset(spec: DataSpec, dims: ModelDims, num_sequences: int) -> Dataset:
    """Held-out sequences from the training data's own source: the same length distribution
    and the same token chain (so the model can learn what it is judged on), other draws.
    Synthetic presets only: a user file has no source to draw more sequences from."""
    if spec.path is not None:
        raise UserError(f"{spec.path}: an evaluation set is drawn from a synthetic preset's "
                        "source; a quality target needs a workload with data.preset")
    length_rng, token_rng = _rngs(spec.seed, held_out=True)
    lengths = _PRESET_LENGTHS[spec.preset](num_sequences, spec.max_len, length_rng)
    seqs, floor = MarkovSource(dims.vocab, spec.seed).sample(lengths, token_rng)
    return Dataset(seqs, f"preset:{spec.preset} (held out)", floor)
