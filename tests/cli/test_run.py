"""`autotune run` end to end on recorded measurements: the tuned config is the best measured,
the same seed gives the same answer, and bad input is one line. Killing the run and resuming
it is tested on live measurements in tests/faults/test_fault_injection.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from autotune.cli import main
from autotune.config import RunConfig, SearchSpace, Workload, load_yaml
from autotune.predict import StepPredictor
from autotune.tune.rundir import RunDir
from autotune.tune.study import Study
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from profilers.records import Measurement

WORKLOAD = {
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96},
    "data": {"preset": "longsft", "num_sequences": 128, "max_len": 512, "seed": 0},
    "budget": {"global_batch_tokens": 2048, "trials": 8},
}


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, float]:
    """A workload file and a recorded measurement of every candidate of its space (a
    machine unknown to the prior: 2.2x compute, 4 ms per micro-batch, 40 ms per step)."""
    monkeypatch.chdir(tmp_path)  # no models/ here: the prior on measured ceilings
    wl_path = tmp_path / "workload.yaml"
    wl_path.write_text(yaml.safe_dump(WORKLOAD))
    rcs = list(SearchSpace().grid(Workload.model_validate(WORKLOAD)))
    ceil = Ceilings({"fp32": 1e10, "bf16": 2e9}, 1e10)
    comp, _ = StepPredictor(StepModels("fp", "cpu", ceil)).compose(rcs)
    mbs = np.exp(comp.log_micro_batches.to_numpy())
    step = 2.2 * comp.compute_s.to_numpy() + 4e-3 * mbs + 0.04
    rows = []
    for rc, s, tokens in zip(rcs, step, comp.tokens_per_step):
        # the faster, the more memory: a throughput/memory trade-off to find a front in
        m = Measurement(status="COMPLETE", tokens_per_s=tokens / s, step_time_s=s,
                        step_times_s=[s] * 3, peak_mem_bytes=int(1e7 + 1e4 * tokens / s),
                        warmup_steps=1, timed_steps=3)
        rows.append({"config_json": rc.model_dump_json(), "measurement_json": m.model_dump_json()})
    table = tmp_path / "table.parquet"
    pd.DataFrame(rows).to_parquet(table)
    return wl_path, table, float(max(tokens / s for s, tokens in zip(step, comp.tokens_per_step)))


def test_run_on_replay_hands_back_the_best_measured(setup, capsys: pytest.CaptureFixture) -> None:
    wl, table, best = setup
    assert main(["run", "--workload", str(wl), "--replay", str(table), "--out", "run1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured_trials"] == 8
    trials = Study(f"sqlite:///{Path('run1/study.db').resolve()}").trials()
    assert all(t.ok for t in trials)  # the baseline too: spelled as the space spells it
    measured = max(t.measurement.tokens_per_s for t in trials)
    assert out["tokens_per_s"] == pytest.approx(measured)
    assert out["tokens_per_s"] >= 0.9 * best  # 8 of several hundred candidates
    tuned = RunConfig.model_validate(yaml.safe_load(Path(out["tuned"]).read_text()))
    assert tuned.label() == out["config"]
    report = Path("run1/report.md").read_text()
    assert "Predicted against measured" in report and "Tuned config" in report


def test_same_seed_and_recorded_measurements_give_the_identical_tuned_config(
        setup, capsys: pytest.CaptureFixture) -> None:
    """Determinism: two runs, the same seed, the same recorded table (baselines included,
    whose samplers are seeded) measure the same configs in the same order and hand back the
    same tuned config, byte for byte."""
    wl, table, _ = setup
    runs = []
    for out, seed in (("det1", "7"), ("det2", "7"), ("det3", "8")):
        assert main(["run", "--workload", str(wl), "--replay", str(table), "--out", out,
                     "--seed", seed, "--baselines", "--budget-trials", "6", "--json"]) == 0
        capsys.readouterr()
        storage = f"sqlite:///{Path(out, 'study.db').resolve()}"
        runs.append(([t.rc.model_dump_json() for t in Study(storage).trials()],
                     [t.rc.model_dump_json() for t in Study(storage, "baselines").trials()],
                     Path(out, "tuned.yaml").read_bytes()))
    assert runs[0] == runs[1]
    assert len(runs[0][0]) == 6 and runs[0][1]
    assert runs[2][1] != runs[0][1]  # another seed samples other baselines: the check can fail


def test_baselines_run_at_the_tuners_budget_and_resume_repeats_nothing(
        setup, capsys: pytest.CaptureFixture) -> None:
    wl, table, _ = setup
    argv = ["run", "--workload", str(wl), "--replay", str(table), "--out", "run3",
            "--budget-trials", "6", "--baselines", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    truth = {RunConfig.model_validate_json(r.config_json).label():
             json.loads(r.measurement_json)["tokens_per_s"]
             for r in pd.read_parquet(table).itertuples()}
    assert set(out["baselines"]) == {"deepspeed-style", "tpe-measured", "random"}
    for name, b in out["baselines"].items():
        assert 1 <= b["measurements"] <= 6, name
        assert b["tokens_per_s"] == pytest.approx(truth[b["config"]])  # a measured figure
    storage = f"sqlite:///{Path('run3/study.db').resolve()}"
    base = Study(storage, "baselines").trials()
    tuned = Study(storage).trials()
    keys = [t.rc.model_dump_json() for t in base + tuned]
    assert len(keys) == len(set(keys))  # no config measured twice across strategies
    folders = [RunDir(Path("run3")).trial_path(t.n, study) for study, ts in
               (("baselines", base), ("measured", tuned)) for t in ts]
    assert len(set(folders)) == len(keys)  # one folder each, holding its own config
    assert all(load_yaml(RunConfig, f / "config.yaml").model_dump_json() == t.rc.model_dump_json()
               for f, t in zip(folders, base + tuned, strict=True))
    report = Path("run3/report.md").read_text()
    assert "same measurement budget" in report and "Cost breakdown" in report
    assert main(argv) == 0  # the same command again: everything answered from the study
    again = json.loads(capsys.readouterr().out)
    assert again["baselines"] == out["baselines"]
    assert len(Study(storage, "baselines").trials()) == len(base)
    assert len(Study(storage).trials()) == len(tuned)


def test_pareto_mode_reports_the_measured_front(setup, capsys: pytest.CaptureFixture) -> None:
    wl, table, _ = setup
    assert main(["run", "--workload", str(wl), "--replay", str(table), "--out", "run4",
                 "--budget-trials", "6", "--pareto", "--predicted-trials", "400", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured_trials"] == 6
    trials = [t for t in Study(f"sqlite:///{Path('run4/study.db').resolve()}").trials() if t.ok]
    report = Path("run4/report.md").read_text()
    section = report.split("## Throughput / memory Pareto front (measured)")[1].split("##")[0]
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    pts = {t.rc.label(): (t.measurement.tokens_per_s, t.measurement.peak_mem_bytes) for t in trials}
    brute = {k for k, (a, b) in pts.items()
             if not any(c >= a and d <= b and (c, d) != (a, b) for c, d in pts.values())}
    assert listed == brute and len(listed) >= 2


@pytest.mark.parametrize("argv, expected", [
    (["run", "--workload", "{wl}", "--budget-trials", "0"], "expected a positive integer, got 0"),
    (["run", "--workload", "{wl}", "--resume", "{tmp}"], "not a run directory"),
    (["run", "--workload", "{wl}", "--replay", "{table}", "--out", "r",
      "--storage", "postgresql://nobody@127.0.0.1:1/none"], "--storage postgresql://"),
    (["run", "--workload", "{tiny_cap}", "--replay", "{table}"], "no candidate fits memory_cap_gb"),
])
def test_bad_input(setup, capsys: pytest.CaptureFixture, argv: list[str], expected: str,
                   tmp_path: Path) -> None:
    wl, table, _ = setup
    tiny_cap = tmp_path / "tiny_cap.yaml"
    tiny_cap.write_text(yaml.safe_dump(WORKLOAD | {"budget": WORKLOAD["budget"]
                                                   | {"memory_cap_gb": 0.0001}}))
    argv = [a.format(wl=wl, tmp=tmp_path, table=table, tiny_cap=tiny_cap) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_a_plan_folder_is_planned_into_again_and_nothing_else_is(
        setup, capsys: pytest.CaptureFixture) -> None:
    wl, _, _ = setup
    argv = ["run", "--workload", str(wl), "--plan-only", "--models", "prior", "--out", "plan"]
    assert main(argv) == 0 and main(argv) == 0  # the second run replaces the first's plan
    assert {f.name for f in Path("plan").iterdir()} == {"plan.md", "tuned.yaml"}
    Path("plan", "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(argv) == 2
    assert "exists, is not empty and is not a run directory" in capsys.readouterr().err
