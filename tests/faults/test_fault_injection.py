"""Fault injection: every way a trial can fail is a recorded measurement, and the driver itself
can be killed at any point without losing or repeating a measurement or leaving a process.

Faults injected here (each a real fault in a real process tree, no mocks):

``test_a_search_survives_a_fault_in_every_trial`` -- one live `autotune run` on 2 CPU ranks
per trial (torchrun), 8 trials, a different fault armed in six of them (``AUTOTUNE_FAULT``
with ``trial=N``; the trial folders of trials 5 and 6 are tiny tmpfs mounts):

=====  ================================================  ===============================
trial  fault                                             recorded as
=====  ================================================  ===============================
1      rank 0 aborts (SIGABRT) before its first step     CRASHED, rank 0 killed by SIGABRT
2      rank 1 runs out of memory (MemoryError) at step 2  OOM
3      rank 1 hangs at step 2                             TIMEOUT, after --timeout
4      rank 1 dies (SIGABRT) mid-trial, rank 0 healthy    CRASHED, rank 1 killed by SIGABRT
5      the trial folder is read-only                      CRASHED, "Read-only file system"
6      the trial folder's file system is full             CRASHED, "No space left on device"
=====  ================================================  ===============================

``test_a_trial_over_the_memory_cap_is_oom`` -- a real OOM: a trial whose process tree
outgrows the workload's memory cap.

``test_ten_sigkills_of_the_driver_lose_and_repeat_nothing`` -- 10 SIGKILLs of the `autotune
run` driver (the driver alone, not its process group, as the kernel's OOM killer or a lost
node would) at random points of a live search on 2 CPU ranks per trial, each followed by a
check of the process table (no process of the run left) and of the study (every measurement
completed before is still there, in order), then a resume to the end: every trial measured
exactly once.

``test_a_full_study_storage_stops_the_run_in_one_line_and_resumes`` -- the study's own
SQLite file fills its file system mid-run, under `autotune run` and under `autotune worker`:
the command stops with one line and exit code 1 (it cannot record, so it must not measure
on), every trial recorded before is kept, and the same command, once there is room,
finishes without repeating one.

7 faults in trials (6 in one search, 1 over the memory cap), 10 driver kills and 2 full
studies: 19 faults injected, each survived.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from autotune.config import RunConfig
from autotune.measure import measure
from autotune.search import TrialLog
from profilers.records import Status

WORKLOAD = {
    "model": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "ffn": 64, "vocab": 64},
    "data": {"preset": "longsft", "num_sequences": 64, "max_len": 128},
    "budget": {"global_batch_tokens": 512, "memory_cap_gb": 4, "trials": 8},
    "hardware": {"device": "cpu", "devices_per_node": 2},
}
FAULTS = {  # trial -> (AUTOTUNE_FAULT part or folder fault, status, words of the reason)
    1: ("crash:rank=0:step=1:trial=1", Status.CRASHED, "rank 0 killed by signal 6 (SIGABRT)"),
    2: ("oom:rank=1:step=2:trial=2", Status.OOM, "MemoryError"),
    3: ("hang:rank=1:step=2:trial=3", Status.TIMEOUT, "timeout"),
    4: ("crash:rank=1:step=2:trial=4", Status.CRASHED, "rank 1 killed by signal 6 (SIGABRT)"),
    5: ("read-only", Status.CRASHED, "Read-only file system"),
    6: ("full", Status.CRASHED, "No space left on device"),
}


def _processes_under(path: Path) -> list[str]:
    """Live processes whose command line names ``path`` (every trial's ranks, launcher and
    reaper name their trial folder; the driver names the run folder)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(
                    str(path) in part for part in (p.info["cmdline"] or [])):
                found.append(" ".join(p.info["cmdline"]))
        except psutil.Error:
            continue
    return found


def _wait_no_processes(path: Path, within_s: float) -> list[str]:
    deadline = time.monotonic() + within_s
    while (left := _processes_under(path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _driver(tmp_path: Path, out: Path, budget: int, *extra: str) -> list[str]:
    wl = tmp_path / "workload.yaml"
    if not wl.exists():
        wl.write_text(yaml.safe_dump(WORKLOAD))
    return [sys.executable, "-m", "autotune", "run", "--workload", str(wl), "--out", str(out),
            "--budget-trials", str(budget), "--steps", "1", "--warmup", "1", "--models", "prior",
            *extra]


def test_a_search_survives_a_fault_in_every_trial(tmp_path: Path, tmpfs) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    env = {**os.environ, "AUTOTUNE_FAULT": ",".join(
        spec for spec, _, _ in FAULTS.values() if ":" in spec)}
    # The run's first trial (the untuned baseline) before the faulty folders exist: `--out`
    # takes an empty folder or a run to continue, and continuing is what happens next.
    first = subprocess.run(_driver(tmp_path, out, 1, "--timeout", "120"), env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs(out / "trials" / "005"))], check=True)
    tmpfs(out / "trials" / "006")
    (out / "trials" / "006" / "fill").write_bytes(b"\0" * 64 * 1024)  # every page taken

    # --timeout: what the hung trial costs; a healthy 2-rank trial takes ~6 s here (2.5x margin).
    done = subprocess.run(_driver(tmp_path, out, 8, "--timeout", "16"), env=env,
                          capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    trials = TrialLog(f"sqlite:///{out / 'study.db'}").trials()
    assert [t.n for t in trials] == list(range(8))  # the search went on after every fault
    survived = 0
    for t in trials:
        if t.n not in FAULTS:
            assert t.ok, (t.n, t.measurement.reason, t.measurement.log_tail)
            continue
        spec, status, words = FAULTS[t.n]
        m = t.measurement
        assert m.status is status and words in m.reason, (t.n, m.status, m.reason)
        if ":" in spec:  # a process fault: the log says what happened
            assert m.log_tail, (t.n, m.reason)
        survived += 1
    assert survived == len(FAULTS) == 6
    assert done.stderr.count("folder not written") == 2  # 5 and 6: said, not fatal
    tuned = RunConfig.model_validate(yaml.safe_load((out / "tuned.yaml").read_text()))
    best = max((t for t in trials if t.ok), key=lambda t: t.measurement.tokens_per_s)
    assert tuned.model_dump_json() == best.rc.model_dump_json()
    assert _wait_no_processes(tmp_path, within_s=2.0) == []


def test_a_trial_over_the_memory_cap_is_oom(tmp_path: Path) -> None:
    wl = {**WORKLOAD, "budget": {**WORKLOAD["budget"], "memory_cap_gb": 0.05},
          "hardware": {"device": "cpu", "devices_per_node": 1}}
    rc = RunConfig.model_validate({"workload": wl, "schedule": {"policy": "pack",
                                                                "micro_batch_tokens": 128}})
    m = measure(rc, steps=1, warmup=1, timeout_s=120, workdir=tmp_path / "t")
    assert m.status is Status.OOM, (m.status, m.reason)
    assert "exceeded the 51.2 MiB cap" in m.reason
    assert _wait_no_processes(tmp_path, within_s=2.0) == []


def test_ten_sigkills_of_the_driver_lose_and_repeat_nothing(tmp_path: Path) -> None:
    out, budget = tmp_path / "run", 6
    argv = _driver(tmp_path, out, budget, "--timeout", "120")
    storage = f"sqlite:///{out / 'study.db'}"
    rng = np.random.default_rng(10)
    seen: list[str] = []
    kills_mid_trial = 0
    for _ in range(10):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Start-up takes ~2.5 s and a trial ~6 s here: the kills land in start-up (the study
        # being created included), inside trials, and between a trial's end and its record.
        time.sleep(float(rng.uniform(1.0, 12.0)))
        kills_mid_trial += any("autotune.train.worker" in c for c in _processes_under(out))
        proc.send_signal(signal.SIGKILL)  # the driver only: its trial is in another session
        proc.wait()
        # The reaper ends a trial within a poll; an orphan would run on to the trial's end.
        left = _wait_no_processes(tmp_path, within_s=2.0)
        assert left == [], f"processes outlived the killed driver: {left}"
        if (out / "study.db").exists():
            now = [t.rc.model_dump_json() for t in TrialLog(storage).trials()]
            assert now[:len(seen)] == seen  # nothing completed was lost
            assert len(now) == len(set(now))  # nor measured twice
            seen = now
    assert seen, "no measurement completed between the kills: lengthen the waits"
    assert kills_mid_trial >= 3, "too few kills landed inside a trial to test the reaper"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = [t.rc.model_dump_json() for t in TrialLog(storage).trials()]
    assert final[:len(seen)] == seen
    assert len(final) == budget == len(set(final))
    assert _wait_no_processes(tmp_path, within_s=2.0) == []


@pytest.mark.parametrize("command", ["run", "worker"])
def test_a_full_study_storage_stops_the_run_in_one_line_and_resumes(
        tmp_path: Path, tmpfs, command: str) -> None:  # noqa: ANN001
    import pandas as pd

    table = tmp_path / "empty.parquet"  # every config "not in the replay table": recorded too
    pd.DataFrame({"config_json": [], "measurement_json": []}).to_parquet(table)
    db_dir = tmpfs(tmp_path / "db")
    subprocess.run(["mount", "-o", "remount,size=1m", str(db_dir)], check=True)
    storage = f"sqlite:///{db_dir / 'study.db'}"
    argv = _driver(tmp_path, tmp_path / "run", 8, "--replay", str(table), "--storage", storage)
    if command == "worker":  # a scale-out worker on the same study storage
        # Its claim in flight when the storage failed stays until its heartbeat is stale:
        # short beats, so the resumed worker need not wait 30 s to retake it.
        argv[argv.index("run")] = "worker"
        argv += ["--heartbeat", "1", "--grace", "2"]
    env = {**os.environ, "AUTOTUNE_REPLAY_DELAY_S": "0.2"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_recorded(db_dir / "study.db")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.1)
        with open(db_dir / "fill", "wb", buffering=0) as fh, contextlib.suppress(OSError):
            while fh.write(b"\0" * 4096):  # every page left, until ENOSPC
                pass
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("autotune: error:")]
    assert len(errors) == 1 and "database or disk is full" in errors[0], err[-3000:]
    assert "Traceback" not in err
    (db_dir / "fill").unlink()
    kept = _recorded(db_dir / "study.db")
    assert len(kept) >= 2
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    # Exit 1 here means only that no candidate completed: the table holds none.
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr[-3000:]
    final = _recorded(db_dir / "study.db")
    assert final[:len(kept)] == kept and len(final) == 8 == len(set(final))


def _recorded(db: Path) -> list[str]:
    """The configs recorded in a run's SQLite study, in order, read as plain SQL: opening it
    through Optuna would create its tables, racing the run that is creating them."""
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as con:
        try:
            rows = con.execute(
                "SELECT a.value_json FROM trial_user_attributes a JOIN trials t "
                "ON a.trial_id = t.trial_id WHERE a.key = 'config_json' ORDER BY t.number"
            ).fetchall()
        except sqlite3.OperationalError:  # no tables yet
            return []
    return [json.loads(v) for (v,) in rows]
