"""`autotune worker` processes sharing one PostgreSQL study, measuring through a recorded
table: every candidate the search wants is measured exactly once, the answer is the one a
single worker finds, and a worker killed mid-measurement loses and repeats nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from autotune.cli import main
from autotune.config import SearchSpace, Workload
from autotune.predict import StepPredictor
from autotune.tune.study import Study
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from profilers.records import Measurement

WORKLOAD = {
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96},
    "data": {"preset": "longsft", "num_sequences": 128, "max_len": 512, "seed": 0},
    "budget": {"global_batch_tokens": 2048, "trials": 12},
}


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A workload file and a recorded measurement of every candidate of its space (a
    machine unknown to the prior: 2.2x compute, 4 ms per micro-batch, 40 ms per step)."""
    monkeypatch.chdir(tmp_path)  # no models/ here: every worker prices with the same prior
    wl_path = tmp_path / "workload.yaml"
    wl_path.write_text(yaml.safe_dump(WORKLOAD))
    rcs = list(SearchSpace().grid(Workload.model_validate(WORKLOAD)))
    comp, _ = StepPredictor(StepModels("fp", "cpu", Ceilings({"fp32": 1e10, "bf16": 2e9}, 1e10))
                            ).compose(rcs)
    step = 2.2 * comp.compute_s.to_numpy() + 4e-3 * np.exp(comp.log_micro_batches.to_numpy()) + 0.04
    rows = []
    for rc, s, tokens in zip(rcs, step, comp.tokens_per_step):
        m = Measurement(status="COMPLETE", tokens_per_s=tokens / s, step_time_s=s,
                        step_times_s=[s] * 3, peak_mem_bytes=int(1e7), warmup_steps=1, timed_steps=3)
        rows.append({"config_json": rc.model_dump_json(), "measurement_json": m.model_dump_json()})
    pd.DataFrame(rows).to_parquet(tmp_path / "table.parquet")
    return wl_path, tmp_path / "table.parquet"


def _argv(wl: Path, table: Path, storage: str, *extra: str) -> list[str]:
    return ["worker", "--storage", storage, "--study", "measured", "--workload", str(wl),
            "--replay", str(table), "--json", *extra]


def _spawn(argv: list[str], delay_s: float) -> subprocess.Popen:
    env = {**os.environ, "AUTOTUNE_REPLAY_DELAY_S": str(delay_s)}
    return subprocess.Popen([sys.executable, "-m", "autotune", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(procs: list[subprocess.Popen]) -> list[dict]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out))
    return outs


def _claims(storage: str) -> list:
    import optuna

    return optuna.load_study(study_name="measured", storage=storage).get_trials(deepcopy=False)


def test_four_workers_measure_each_candidate_once_and_agree_with_one(
        setup, pg_database: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    wl, table = setup
    # The reference: one worker alone, in this process, on its own SQLite study.
    alone = f"sqlite:///{tmp_path / 'alone.db'}"
    assert main(_argv(wl, table, alone)) == 0
    single = json.loads(capsys.readouterr().out)
    assert len(single["measured_here"]) == 12

    outs = _finish([_spawn(_argv(wl, table, pg_database), delay_s=0.1) for _ in range(4)])
    trials = Study(pg_database).trials()
    keys = [t.rc.model_dump_json() for t in trials]
    assert len(trials) == 12 == len(set(keys))  # every wanted candidate, none twice
    assert all(t.ok for t in trials)
    measured = sorted(n for o in outs for n in o["measured_here"])
    assert measured == sorted(t.n for t in trials)  # each measured by exactly one worker
    assert {o["study_trials"] for o in outs} == {12}
    best = max(trials, key=lambda t: t.measurement.tokens_per_s)
    assert best.rc.label() == single["config"]
    assert best.measurement.tokens_per_s == pytest.approx(single["tokens_per_s"])


def test_a_killed_workers_claim_is_released_and_measured_once(setup, pg_database: str) -> None:
    from optuna.trial import TrialState

    wl, table = setup
    argv = _argv(wl, table, pg_database, "--heartbeat", "1", "--grace", "2")
    victim = _spawn(argv, delay_s=30.0)  # its one measurement outlasts the whole test
    deadline = time.monotonic() + 60
    while not any(t.state is TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(
            f"-{victim.pid}") for t in _claims_or_none(pg_database)):
        assert time.monotonic() < deadline and victim.poll() is None, "the victim never claimed"
        time.sleep(0.2)
    others = [_spawn(argv, delay_s=0.1) for _ in range(3)]
    # the others at work while the victim measures: one of them has claimed a candidate
    pids, deadline = tuple(f"-{o.pid}" for o in others), time.monotonic() + 60
    while not any(t.user_attrs.get("worker", "").endswith(pids)
                  for t in _claims_or_none(pg_database)):
        assert time.monotonic() < deadline, "no other worker ever claimed"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    outs = _finish(others)
    claims = _claims(pg_database)
    dead = [t for t in claims if t.user_attrs.get("worker", "").endswith(f"-{victim.pid}")]
    assert len(dead) == 1 and dead[0].state is TrialState.FAIL  # released after the grace
    assert "measurement_json" not in dead[0].user_attrs
    assert not [t for t in claims if t.state is TrialState.RUNNING]
    trials = Study(pg_database).trials()
    keys = [t.rc.model_dump_json() for t in trials]
    assert len(trials) == 12 == len(set(keys))  # none lost, none repeated
    assert dead[0].user_attrs["claim"] in keys  # the victim's candidate measured by another
    assert sorted(n for o in outs for n in o["measured_here"]) == sorted(t.n for t in trials)


@pytest.mark.parametrize("storage, expected", [
    ("postgresql://nobody@127.0.0.1:1/none", "--storage postgresql://nobody@127.0.0.1:1/none: "
                                              "cannot open the study"),
    ("mysql://nobody@127.0.0.1:1/none", "workers share a study through PostgreSQL"),
])
def test_a_storage_workers_cannot_share_is_one_line(setup, storage: str, expected: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    wl, table = setup
    assert main(_argv(wl, table, storage)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def _claims_or_none(storage: str) -> list:
    """The claims, or none yet while the first worker is still creating the study."""
    try:
        return _claims(storage)
    except KeyError:
        return []


def test_a_database_gone_mid_run_is_one_line_and_the_study_resumes(
        setup, pg_database: str, postgres_url: str) -> None:
    """The study's database refuses connections while a worker measures (its connections
    cut, new ones refused): the worker stops with one line and exit 1, no traceback; once the
    database is back, a worker finishes the study with nothing lost or repeated."""
    import psycopg2

    wl, table = setup
    argv = _argv(wl, table, pg_database, "--heartbeat", "1", "--grace", "2")
    worker = _spawn(argv, delay_s=0.3)
    deadline = time.monotonic() + 60
    while len(Study(pg_database).trials()) < 3:
        assert time.monotonic() < deadline and worker.poll() is None, "the worker never measured"
        time.sleep(0.1)
    name = pg_database.rsplit("/", 1)[1]
    admin = psycopg2.connect(postgres_url.replace("postgresql+psycopg2://", "postgresql://"))
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s", (name,))
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 1, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("autotune: error:")]
        assert len(errors) == 1 and "the shared study failed" in errors[0], err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    finally:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        admin.close()
    kept = [t.rc.model_dump_json() for t in Study(pg_database).trials()]
    assert len(kept) >= 3
    _finish([_spawn(argv, delay_s=0.0)])
    final = [t.rc.model_dump_json() for t in Study(pg_database).trials()]
    assert final[:len(kept)] == kept and len(final) == 12 == len(set(final))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("first", ["run", "worker"])
def test_run_and_worker_continue_each_others_study(
        setup, backend: str, first: str, tmp_path: Path, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture) -> None:
    """`autotune run` and `autotune worker` are two drivers of one study: half the budget
    measured by one, the other continues to the whole budget, re-measuring nothing."""
    wl, table = setup
    storage = (f"sqlite:///{tmp_path / 'shared.db'}" if backend == "sqlite"
               else request.getfixturevalue("pg_database"))
    run = ["run", "--workload", str(wl), "--replay", str(table), "--storage", storage,
           "--confirm", "0", "--json", "--out"]
    drivers = {"run": lambda k: [*run, str(tmp_path / f"run{k}")],
               "worker": lambda k: _argv(wl, table, storage)}
    order = [first, "worker" if first == "run" else "run"]
    for k, (driver, budget) in enumerate(zip(order, (6, 12), strict=True)):
        assert main([*drivers[driver](k), "--budget-trials", str(budget)]) == 0
        out = json.loads(capsys.readouterr().out)
        if driver == "worker":
            assert len(out["measured_here"]) == budget - 6 * k
        else:
            assert out["measured_trials"] == budget
        trials = Study(storage).trials()
        assert len(trials) == budget == len({t.key for t in trials})
    assert [t.n for t in trials] == list(range(12))
    assert trials[0].rc.schedule.policy == "pad-batch"  # the untuned baseline, measured once
