"""A set of token sequences stored flat, and the synthetic sources that make them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MarkovSource", "SequenceSet", "bimodal_lengths", "fixed_lengths", "longsft_lengths"]

# ChunkFlow's evaluation-set shape (reference/length_distributions.md): bins of
# (low, high, weight) in tokens; a length is log-uniform inside its bin.
_LONGSFT_BINS = ((64, 1024, 0.90), (1024, 4096, 0.08), (4096, 32768, 0.0199),
                 (32768, 300_000, 0.00013))
# The published 32K edge maps onto max_len, so the shape survives any scale.
_REFERENCE_LEN = 32768
MIN_LEN = 2  # one input and one target


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """Token sequences in one flat int32 array; sequence ``i`` is ``tokens[offsets[i]:offsets[i+1]]``."""

    tokens: np.ndarray
    offsets: np.ndarray
    vocab: int

    @classmethod
    def from_lists(cls, seqs: list[np.ndarray] | list[list[int]], vocab: int) -> SequenceSet:
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = (np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
                if seqs else np.zeros(0, dtype=np.int32))
        return cls(tokens=flat, offsets=offsets, vocab=vocab)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def seq(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def _log_uniform_bins(bins, n: int, scale: float, max_len: int,
                      rng: np.random.Generator) -> np.ndarray:
    weights = np.array([b[2] for b in bins], dtype=np.float64)
    which = rng.choice(len(bins), size=n, p=weights / weights.sum())
    lo = np.array([b[0] for b in bins], dtype=np.float64)[which] * scale
    hi = np.array([b[1] for b in bins], dtype=np.float64)[which] * scale
    lengths = np.exp(rng.uniform(np.log(lo), np.log(hi)))
    # Lengths above max_len are truncated, as an SFT pipeline's max_length would.
    return np.clip(np.rint(lengths), MIN_LEN, max_len).astype(np.int64)


def longsft_lengths(n: int, max_len: int, rng: np.random.Generator) -> np.ndarray:
    """Long-tail lengths in the shape of ChunkFlow's evaluation set, scaled to ``max_len``."""
    return _log_uniform_bins(_LONGSFT_BINS, n, max_len / _REFERENCE_LEN, max_len, rng)


def bimodal_lengths(n: int, max_len: int, rng: np.random.Generator,
                    long_fraction: float = 0.1) -> np.ndarray:
    """90% short and medium (the longsft shape up to its 4K edge) and 10% from a normal
    around a long mode at 3/4 of ``max_len``, truncated at ``max_len`` (ChatQA2 style)."""
    scale = max_len / _REFERENCE_LEN
    short = _log_uniform_bins(_LONGSFT_BINS[:2], n, scale, max_len, rng)
    long = rng.normal(0.75 * max_len, 0.1 * max_len, size=n)
    long = np.clip(np.rint(long), MIN_LEN, max_len).astype(np.int64)
    return np.where(rng.random(n) < long_fraction, long, short)


def fixed_lengths(n: int, max_len: int, rng: np.random.Generator) -> np.ndarray:
    """Every sequence ``max_len`` tokens: pre-training's fixed-length samples, the setting
    of published throughput figures."""
    del rng
    return np.full(n, max_len, dtype=np.int64)


class MarkovSource:
    """A sparse order-2 Markov chain over the vocabulary: tokens with learnable structure.

    With probability ``p_order2`` the next token is a fixed function of the last two tokens;
    otherwise it is one of four successors of the last token with probabilities
    ``successor_probs``. A model that learns both parts reaches the entropy floor that
    ``sample`` reports alongside the tokens, so a quality target can be set below the
    unigram loss and above the floor.
    """

    successor_probs = np.array([0.5, 0.25, 0.15, 0.10])
    p_order2 = 0.3

    def __init__(self, vocab: int, seed: int):
        if vocab < 8:
            raise ValueError(f"vocab={vocab} is too small for the Markov source (needs >= 8)")
        self.vocab = vocab
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4D41524B]))
        self.successors = rng.integers(1, vocab, size=(vocab, len(self.successor_probs)))
        self._mix = rng.integers(1, vocab, size=3)

    def _order2(self, prev2: np.ndarray, prev1: np.ndarray) -> np.ndarray:
        a, b, c = self._mix
        return 1 + (prev2 * a + prev1 * b + c) % (self.vocab - 1)

    def sample(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[SequenceSet, float]:
        """Sequences of the given lengths (token 0 begins each), and the mean true
        negative log-likelihood of the targets under the chain (the entropy floor, nats)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.zeros(int(offsets[-1]), dtype=np.int32)
        order = np.argsort(-lengths, kind="stable")
        sorted_len = lengths[order]
        starts = offsets[:-1][order]
        prev2 = np.zeros(len(lengths), dtype=np.int64)
        prev1 = np.zeros(len(lengths), dtype=np.int64)
        nll_sum = 0.0
        cum = np.cumsum(self.successor_probs)
        for t in range(1, int(sorted_len[0]) if len(lengths) else 0):
            alive = int(np.searchsorted(-sorted_len, -t, side="left"))
            p2, p1 = prev2[:alive], prev1[:alive]
            pick = np.minimum(np.searchsorted(cum, rng.random(alive) * cum[-1]), len(cum) - 1)
            succ = self.successors[p1, pick]
            o2 = self._order2(p2, p1)
            nxt = np.where(rng.random(alive) < self.p_order2, o2, succ)
            prob = (1 - self.p_order2) * ((self.successors[p1] == nxt[:, None])
                                          * self.successor_probs).sum(axis=1)
            prob += self.p_order2 * (o2 == nxt)
            nll_sum -= float(np.log(prob).sum())
            tokens[starts[:alive] + t] = nxt
            prev2[:alive], prev1[:alive] = p1, nxt
        targets = int((lengths - 1).sum())
        return SequenceSet(tokens, offsets, self.vocab), nll_sum / max(targets, 1)
