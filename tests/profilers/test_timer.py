from __future__ import annotations

import time
from typing import ClassVar

import pytest
import torch

from profilers.timer import StepTimer, Summary, summarize


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        # sorted [1, 2, 3]: p25 sits halfway between 1 and 2, p75 halfway between 2 and 3
        ([3.0, 1.0, 2.0], Summary(median=2.0, iqr=1.0, mean=2.0, min=1.0, max=3.0, n=3)),
        # p25 at rank 0.75 -> 1.75, p75 at rank 2.25 -> 3.25
        ([4.0, 1.0, 3.0, 2.0], Summary(median=2.5, iqr=1.5, mean=2.5, min=1.0, max=4.0, n=4)),
        # sorted [1, 3, 7, 10, 100]: p25 = 3, p75 = 10 exactly; the outlier moves the mean only
        (
            [10.0, 1.0, 7.0, 3.0, 100.0],
            Summary(median=7.0, iqr=7.0, mean=24.2, min=1.0, max=100.0, n=5),
        ),
        ([5.0], Summary(median=5.0, iqr=0.0, mean=5.0, min=5.0, max=5.0, n=1)),
    ],
)
def test_summarize_matches_hand_computed(samples: list[float], expected: Summary) -> None:
    assert summarize(samples) == expected


def test_summarize_refuses_empty() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        summarize([])


def test_cpu_timer_records_one_sample_per_step() -> None:
    timer = StepTimer("cpu")
    for _ in range(3):
        with timer.step():
            time.sleep(0.01)
    samples = timer.samples
    assert len(samples) == 3
    assert all(0.01 <= s < 1.0 for s in samples)


def test_failed_step_is_not_recorded() -> None:
    timer = StepTimer("cpu")
    with pytest.raises(RuntimeError), timer.step():
        raise RuntimeError("boom")
    assert timer.samples == []


def test_unknown_device_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="'mps'"):
        StepTimer("mps")


class _FakeEvent:
    """Stands in for torch.cuda.Event: the k-th start/end pair spans DURATIONS_MS[k]."""

    DURATIONS_MS: ClassVar[list[float]] = [1.5, 2.0, 4.25]
    created: ClassVar[list[_FakeEvent]] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing, "events without timing cannot be read"
        self.recorded = False
        _FakeEvent.created.append(self)

    def record(self) -> None:
        self.recorded = True

    def elapsed_time(self, end: _FakeEvent) -> float:
        assert self.recorded and end.recorded
        return self.DURATIONS_MS[_FakeEvent.created.index(self) // 2]


def test_cuda_timer_reads_events_after_one_synchronize(monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    _FakeEvent.created = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(1))
    timer = StepTimer("cuda")
    for _ in range(3):
        with timer.step():
            pass
    assert syncs == []  # stepping must not stall the host
    assert timer.samples == [ms / 1000 for ms in _FakeEvent.DURATIONS_MS]
    assert len(syncs) == 1
    assert timer.samples == [0.0015, 0.002, 0.00425]
    assert len(syncs) == 1  # nothing new to resolve, so no second synchronize
