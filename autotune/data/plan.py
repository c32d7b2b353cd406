"""What a scheduling policy produces: the micro-batches of one step and their dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["ChunkGroup", "MicroBatch", "Segment", "StepPlan", "Unit"]


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of one sequence inside a micro-batch.

    Attention runs within a segment only. ``padded - length`` pad tokens follow the real
    ones; causal attention keeps real tokens from seeing them and the loss ignores them.
    """

    seq: int  # index of the sequence within the global batch
    start: int  # first token of the stretch within its sequence
    length: int
    padded: int

    def __post_init__(self) -> None:
        if self.length <= 0 or self.padded < self.length or self.start < 0:
            raise ValueError(f"bad segment {self}")


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """Segments laid end to end in one forward/backward pass."""

    segments: tuple[Segment, ...]

    @property
    def tokens(self) -> int:
        return sum(s.padded for s in self.segments)

    @property
    def real_tokens(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def attention_pairs(self) -> int:
        """Score-matrix entries of causal attention: each segment's queries against its
        prefix and itself (what score-sized buffers grow with)."""
        return sum(s.padded * (s.padded + s.start) for s in self.segments)

    @property
    def continues(self) -> bool:
        """Whether the first segment continues its sequence from an earlier chunk."""
        return self.segments[0].start > 0


@dataclass(frozen=True, slots=True)
class ChunkGroup:
    """ChunkFlow's dependent chunks of one long sequence, in sequence order.

    The first segment of every chunk is the next piece of the sequence; chunk ``j`` attends
    to the key/value state of chunks ``0..j-1``. The last ``keep`` chunks keep their
    activations from the forward pass; the others are recomputed during backward.
    """

    chunks: tuple[MicroBatch, ...]
    keep: int

    def __post_init__(self) -> None:
        first = self.chunks[0].segments[0]
        for prev, cur in zip(self.chunks, self.chunks[1:]):
            p, c = prev.segments[0], cur.segments[0]
            if c.seq != first.seq or c.start != p.start + p.length:
                raise ValueError("chunks of a group must continue one sequence in order")


Unit = MicroBatch | ChunkGroup


@dataclass
class StepPlan:
    units: list[Unit] = field(default_factory=list)

    def micro_batches(self) -> Iterator[MicroBatch]:
        for unit in self.units:
            if isinstance(unit, ChunkGroup):
                yield from unit.chunks
            else:
                yield unit

    @property
    def n_micro(self) -> int:
        return sum(1 for _ in self.micro_batches())

    @property
    def tokens(self) -> int:
        return sum(mb.tokens for mb in self.micro_batches())

    @property
    def real_tokens(self) -> int:
        return sum(mb.real_tokens for mb in self.micro_batches())

    def recomputed_tokens(self) -> int:
        """Tokens whose forward runs twice because their chunk's activations were dropped."""
        return sum(mb.tokens for u in self.units if isinstance(u, ChunkGroup)
                   for mb in u.chunks[:max(len(u.chunks) - u.keep, 0)])
