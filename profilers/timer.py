"""Step timing (perf_counter on CPU, CUDA events on GPU) and the statistic reported from it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["StepTimer", "Summary", "summarize"]


@dataclass(frozen=True, slots=True)
class Summary:
    """Statistics of timed samples, in the samples' unit (seconds for step times).

    Attributes:
        median: the figure reported; robust to the odd slow step (GC, page faults).
        iqr: p75 - p25 with numpy's default linear interpolation.
    """

    median: float
    iqr: float
    mean: float
    min: float
    max: float
    n: int


def summarize(samples: Sequence[float]) -> Summary:
    """Median, IQR, mean, min and max of ``samples``.

    Raises:
        ValueError: ``samples`` is empty.

    Example:
        >>> summarize([1.0, 2.0, 3.0, 4.0]).iqr
        1.5
    """
    if len(samples) == 0:
        raise ValueError("summarize() needs at least one sample, got none")
    arr = np.asarray(samples, dtype=np.float64)
    p25, p50, p75 = np.percentile(arr, [25.0, 50.0, 75.0])
    return Summary(
        median=float(p50),
        iqr=float(p75 - p25),
        mean=float(arr.mean()),
        min=float(arr.min()),
        max=float(arr.max()),
        n=int(arr.size),
    )


class StepTimer:
    """Times one step per ``with timer.step():`` block; the caller keeps warm-up steps outside.

    On CUDA each step is bracketed by a pair of events and nothing synchronizes until
    ``samples`` is read, so timing adds no host stall between steps. A step that raises is
    not recorded.

    Example:
        >>> timer = StepTimer("cpu")
        >>> with timer.step():
        ...     pass
        >>> len(timer.samples)
        1
    """

    def __init__(self, device_kind: str) -> None:
        if device_kind not in ("cpu", "cuda"):
            raise ValueError(f"device_kind={device_kind!r} is not one of 'cpu', 'cuda'")
        self.device_kind = device_kind
        self._done: list[float] = []
        self._pending: list[tuple[Any, Any]] = []

    @contextmanager
    def step(self) -> Iterator[None]:
        """Time the enclosed block as one step."""
        if self.device_kind == "cuda":
            with self._cuda_step():
                yield
        else:
            start = time.perf_counter()
            yield
            self._done.append(time.perf_counter() - start)

    @contextmanager
    def _cuda_step(self) -> Iterator[None]:
        import torch

        start: torch.cuda.Event = torch.cuda.Event(enable_timing=True)
        end: torch.cuda.Event = torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((start, end))

    @property
    def samples(self) -> list[float]:
        """Every recorded step time in seconds, in order; on CUDA, synchronizes once if needed."""
        if self._pending:
            import torch

            # One synchronize for all pending steps: events are complete only after it.
            torch.cuda.synchronize()
            self._done.extend(s.elapsed_time(e) / 1000.0 for s, e in self._pending)
            self._pending.clear()
        return list(self._done)
