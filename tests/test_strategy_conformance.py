"""Every strategy of the registry against the same contract, on real measurements (the
132-config CPU sweep in results/tuner/exhaustive.parquet, replayed): it stays within its
budget, never measures a config twice, is deterministic under a seed, and after a kill the
same strategy started again over the study finishes with exactly the uninterrupted run's
configs, measuring none of those measured before the kill. A strategy added to
``STRATEGIES`` is checked here without a line of this file changing."""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune.portfolio import baseline_configs
from autotune.tune.sources import Recorded, ReplaySource
from autotune.tune.strategies import STRATEGIES, Context, drive, make
from autotune.tune.study import Pick, Study, Trial
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from suites.tuner import _table

TABLE = Path(__file__).resolve().parents[1] / "results" / "tuner"
BUDGET = 12
KILLED_AFTER = 5


class Killed(Exception):
    """The driver's process dying, as far as the strategy can tell."""


@pytest.fixture(scope="module")
def world() -> tuple[list, ReplaySource, StepModels]:
    _, space = _table(TABLE)
    # A prior the sweep's machine does not match: the strategies must cope with its errors.
    models = StepModels("fp", "cpu", Ceilings({"fp32": 5e10, "bf16": 5e9}, 2e10))
    return space, ReplaySource([TABLE / "exhaustive.parquet"]), models


class Counting:
    """Measures through the replay, recording into a study as a run does; counts every
    measurement taken and dies after ``die_after`` of them."""

    def __init__(self, source: ReplaySource, study: Study | None = None,
                 die_after: int | None = None) -> None:
        self.source, self.study, self.die_after = source, study, die_after
        self.calls: list[str] = []

    def __call__(self, pick: Pick) -> Trial:
        if self.die_after is not None and len(self.calls) >= self.die_after:
            raise Killed
        self.calls.append(pick.rc.model_dump_json())
        n = self.study.next_number() if self.study else len(self.calls) - 1
        trial = Trial(n, pick.rc, self.source(pick.rc), pick.predicted_tokens_per_s,
                      pick.predicted_peak_mem_bytes)
        if self.study is not None:
            self.study.add(trial)
        return trial


def _run(name: str, world: tuple, measure: Recorded, seed: int = 0) -> list[Trial]:
    space, _, models = world
    user = baseline_configs(space[0].workload)[0]
    ctx = Context(space, models, user=user, seed=seed, budget=BUDGET, predicted_trials=150)
    return drive(make(name, ctx), measure, budget=BUDGET)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_budget_distinct_and_deterministic(name: str, world: tuple) -> None:
    runs = []
    for _ in range(2):
        counting = Counting(world[1])
        trials = _run(name, world, Recorded(counting), seed=7)
        assert 0 < len(trials) <= BUDGET
        assert len(counting.calls) == len(set(counting.calls)) == len(trials)
        runs.append([t.key for t in trials])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_resumes_after_a_kill_without_repeating(name: str, world: tuple, tmp_path: Path) -> None:
    whole = Counting(world[1])
    expected = [t.key for t in _run(name, world, Recorded(whole))]
    assert len(expected) > KILLED_AFTER  # the kill lands inside the search

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    before = Counting(world[1], Study(storage), die_after=KILLED_AFTER)
    with pytest.raises(Killed):
        _run(name, world, Recorded(before))
    kept = Study(storage).trials()  # what a new process finds
    assert [t.key for t in kept] == expected[:KILLED_AFTER]

    after = Counting(world[1], Study(storage))
    resumed = _run(name, world, Recorded(after, kept))
    assert [t.key for t in resumed] == expected
    assert set(after.calls).isdisjoint(before.calls)  # nothing measured twice
    assert len(before.calls) + len(after.calls) == len(whole.calls)
    assert sorted(t.key for t in Study(storage).trials()) == sorted(expected)
