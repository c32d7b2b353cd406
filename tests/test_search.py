"""The guided search on recorded measurements: it finds the best config with a fraction of
the measurements, and a resumed search repeats and loses none."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import RunConfig, SearchSpace, Workload
from autotune.predict import StepPredictor
from autotune.tune.sources import Recorded, ReplaySource
from autotune.tune.strategies import Context, drive, make
from autotune.tune.study import Pick, Study, Trial, config_key
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from profilers.records import Measurement

WORKLOAD = {
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96},
    "data": {"preset": "longsft", "num_sequences": 128, "max_len": 512, "seed": 0},
    "budget": {"global_batch_tokens": 2048, "memory_cap_gb": 16 / 1024},
}
CEIL = Ceilings({"fp32": 1e10, "bf16": 2e10}, 1e10)
OOM_BYTES = 16 * 2**20  # the workload's memory cap


def _space() -> list[RunConfig]:
    space = SearchSpace(policy=["pad-batch", "sorted", "pack", "chunkflow", "skrull"],
                        micro_batch_tokens=[128, 256, 512, 1024], chunk_size=[64, 128],
                        micro_batch_size=[1, 2, 4, 8], dtype=["fp32", "bf16"])
    return list(space.grid(Workload.model_validate(WORKLOAD)))


def _truth_table(rcs: list[RunConfig], path: Path) -> Path:
    """A machine the prior does not know, with effects outside what the calibration can
    express: 2.2x its compute, 4 ms per micro-batch and 40 ms per step, a 30% slowdown for
    micro-batches past 512 tokens (their working set leaves the cache: no term of the
    calibration is a step function), peak memory growing with the micro-batch's tokens
    (less the more is checkpointed), and configs past the workload's 16 MiB cap out of
    memory; 3% noise."""
    comp, _ = StepPredictor(StepModels("fp", "cpu", CEIL), warmup=1, steps=3).compose(rcs)
    rng = np.random.default_rng(0)
    mbs = np.exp(comp.log_micro_batches.to_numpy())
    mb_tokens = np.exp(comp.log_tokens_per_micro_batch.to_numpy())
    cliff = np.where(mb_tokens > 512, 1.3, 1.0)
    step = (2.2 * comp.compute_s + 4e-3 * mbs + 0.04) * cliff * rng.uniform(0.97, 1.03, len(rcs))
    per_token = {"none": 4e4, "selective": 2.5e4, "full": 8e3}
    peak = 2e6 + mb_tokens * np.array([per_token[rc.checkpointing.policy] for rc in rcs])
    rows = []
    for rc, s, tokens, p in zip(rcs, step, comp.tokens_per_step, peak, strict=True):
        if p > OOM_BYTES:
            m = Measurement(status="OOM", reason="out of memory", peak_mem_bytes=int(p))
        else:
            m = Measurement(status="COMPLETE", tokens_per_s=tokens / s, step_time_s=s,
                            step_times_s=[s, s, s], peak_mem_bytes=int(p), warmup_steps=1,
                            timed_steps=3)
        rows.append({"config_json": rc.model_dump_json(), "measurement_json": m.model_dump_json()})
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_guided_search_finds_the_best_with_a_seventh_of_the_measurements(tmp_path: Path) -> None:
    rcs = _space()
    assert len(rcs) >= 100
    source = ReplaySource([_truth_table(rcs, tmp_path / "truth.parquet")])
    best = max(m.tokens_per_s or 0 for m in source.table.values())
    assert sum(m.status.value == "OOM" for m in source.table.values()) > 0.05 * len(rcs)
    budget = int(0.15 * len(rcs))
    ctx = Context(rcs, StepModels("fp", "cpu", CEIL), budget=budget, batch=3)
    trials = drive(make("guided", ctx), Recorded.measuring(source), budget=budget)
    assert len(trials) == budget
    assert len({config_key(t.rc) for t in trials}) == budget  # none measured twice
    found = max(t.measurement.tokens_per_s or 0 for t in trials)
    # An OOM teaches it the memory it lacks: at most a quarter of the budget spent on them
    # (11 of 28 when the memory model learned from completed trials alone).
    assert sum(t.measurement.status.value == "OOM" for t in trials) <= budget // 4
    assert found >= 0.97 * best


def test_a_resumed_search_repeats_and_loses_nothing(tmp_path: Path) -> None:
    rcs = _space()
    source = ReplaySource([_truth_table(rcs, tmp_path / "truth.parquet")])
    calls: list[str] = []

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = Study(storage)

    def counting(pick: Pick) -> Trial:
        calls.append(config_key(pick.rc))
        trial = Trial(study.next_number(), pick.rc, source(pick.rc), pick.predicted_tokens_per_s)
        study.add(trial)
        return trial

    def guided(budget: int, done: list[Trial]) -> list[Trial]:
        ctx = Context(rcs, StepModels("fp", "cpu", CEIL), budget=budget)
        return drive(make("guided", ctx), counting, budget=budget, history=done)

    first = guided(5, [])
    back = Study(storage).trials()  # a new process would see exactly these
    assert [config_key(t.rc) for t in back] == [config_key(t.rc) for t in first]
    assert [t.measurement.tokens_per_s for t in back] == [t.measurement.tokens_per_s for t in first]
    assert [t.predicted_tokens_per_s for t in back] == [t.predicted_tokens_per_s for t in first]
    more = guided(12, back)
    assert len(more) == 12 and len(calls) == 12 == len(set(calls))
    assert len(Study(storage).trials()) == 12


def test_replay_answers_unknown_configs_as_crashed(tmp_path: Path) -> None:
    rcs = _space()
    source = ReplaySource([_truth_table(rcs[:3], tmp_path / "t.parquet")])
    assert source(rcs[0]).status.value == "COMPLETE"
    m = source(rcs[5])
    assert m.status.value == "CRASHED" and "not in the replay table" in m.reason
    assert json.loads(m.model_dump_json())["status"] == "CRASHED"
