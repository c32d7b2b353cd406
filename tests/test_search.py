"""The guided search on recorded measurements: it finds the best config with a fraction of
the measurements, and a resumed search repeats and loses none."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import RunConfig, SearchSpace, Workload
from autotune.predict import StepPredictor
from autotune.search import ReplaySource, TrialLog, config_key, guided_search
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from profilers.records import Measurement

WORKLOAD = {
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96},
    "data": {"preset": "longsft", "num_sequences": 128, "max_len": 512, "seed": 0},
    "budget": {"global_batch_tokens": 2048},
}
CEIL = Ceilings({"fp32": 1e10, "bf16": 2e10}, 1e10)


def _space() -> list[RunConfig]:
    space = SearchSpace(policy=["pad-batch", "sorted", "pack", "chunkflow", "skrull"],
                        micro_batch_tokens=[128, 256, 512, 1024], chunk_size=[64, 128],
                        micro_batch_size=[1, 2, 4, 8], dtype=["fp32", "bf16"])
    return list(space.grid(Workload.model_validate(WORKLOAD)))


def _truth_table(rcs: list[RunConfig], path: Path) -> Path:
    """A machine the prior does not know: 2.2x its compute, 4 ms per micro-batch and 40 ms
    per step, with 3% noise."""
    comp, _ = StepPredictor(StepModels("fp", "cpu", CEIL), warmup=1, steps=3).compose(rcs)
    rng = np.random.default_rng(0)
    mbs = np.exp(comp.log_micro_batches.to_numpy())
    step = (2.2 * comp.compute_s + 4e-3 * mbs + 0.04) * rng.uniform(0.97, 1.03, len(rcs))
    rows = []
    for rc, s, tokens in zip(rcs, step, comp.tokens_per_step):
        m = Measurement(status="COMPLETE", tokens_per_s=tokens / s, step_time_s=s,
                        step_times_s=[s, s, s], peak_mem_bytes=1e6, warmup_steps=1, timed_steps=3)
        rows.append({"config_json": rc.model_dump_json(), "measurement_json": m.model_dump_json()})
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_guided_search_finds_the_best_with_a_seventh_of_the_measurements(tmp_path: Path) -> None:
    rcs = _space()
    assert len(rcs) >= 100
    source = ReplaySource([_truth_table(rcs, tmp_path / "truth.parquet")])
    best = max(m.tokens_per_s for m in source.table.values())
    budget = int(0.15 * len(rcs))
    trials = guided_search(rcs, StepModels("fp", "cpu", CEIL), source, budget=budget, batch=3)
    assert len(trials) == budget
    assert len({config_key(t.rc) for t in trials}) == budget  # none measured twice
    found = max(t.measurement.tokens_per_s for t in trials)
    assert found >= 0.97 * best


def test_a_resumed_search_repeats_and_loses_nothing(tmp_path: Path) -> None:
    rcs = _space()
    source = ReplaySource([_truth_table(rcs, tmp_path / "truth.parquet")])
    calls: list[str] = []

    def counting(rc: RunConfig, n: int) -> Measurement:
        calls.append(config_key(rc))
        return source(rc, n)

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    log = TrialLog(storage)
    first = guided_search(rcs, StepModels("fp", "cpu", CEIL), counting, budget=5, on_trial=log.add)
    back = TrialLog(storage).trials()  # a new process would see exactly these
    assert [config_key(t.rc) for t in back] == [config_key(t.rc) for t in first]
    assert [t.measurement.tokens_per_s for t in back] == [t.measurement.tokens_per_s for t in first]
    more = guided_search(rcs, StepModels("fp", "cpu", CEIL), counting, budget=12, done=back,
                         on_trial=log.add)
    assert len(more) == 12 and len(calls) == 12 == len(set(calls))
    assert len(TrialLog(storage).trials()) == 12


def test_replay_answers_unknown_configs_as_crashed(tmp_path: Path) -> None:
    rcs = _space()
    source = ReplaySource([_truth_table(rcs[:3], tmp_path / "t.parquet")])
    assert source(rcs[0], 0).status.value == "COMPLETE"
    m = source(rcs[5], 1)
    assert m.status.value == "CRASHED" and "not in the replay table" in m.reason
    assert json.loads(m.model_dump_json())["status"] == "CRASHED"
