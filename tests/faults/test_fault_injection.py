"""Fault injection: every way a trial can fail is a recorded measurement, and the driver itself
can be killed at any point without losing or repeating a measurement or leaving a process.

Faults injected here (each a real fault in a real process tree, no mocks):

``test_a_search_survives_a_fault_in_every_trial`` -- one live `autotune run` on 2 CPU ranks
per trial (torchrun), 8 trials, a different fault armed in six of them (``AUTOTUNE_FAULT``
with ``trial=N``; the trial folders of trials 5 and 6 are tiny tmpfs mounts, which need
root: without mount rights the four process faults run alone, with a warning):

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

``test_sigkills_of_the_driver_lose_and_repeat_nothing`` -- 10 SIGKILLs (4 in make test, all
10 with -m slow) of the `autotune run` driver (the driver alone, not its process group, as
the kernel's OOM killer or a lost node would) in a live search on 2 CPU ranks per trial,
each on an observed event rather than after a sleep (seeded, which event: start-up, a trial
starting, its ranks running, its result written but not recorded, a trial recorded), each
followed by a check of the process table (no process of the run left) and of the study
(every measurement completed before is still there, in order), then a resume to the end:
every trial measured exactly once.

``test_a_full_study_storage_stops_the_run_in_one_line_and_resumes`` -- the study's own
SQLite file fills its file system mid-run, under `autotune run` and under `autotune worker`:
the command stops with one line and exit code 1 (it cannot record, so it must not measure
on), every trial recorded before is kept, and the same command, once there is room,
finishes without repeating one.

7 faults in trials (6 in one search, 1 over the memory cap), 10 driver kills (4 in make
test) and 2 full studies: 19 faults injected, each survived.

Nothing here is tuned to one machine's speed, so a slow or loaded machine checks the same
things: the tests wait for events (a file, a record, a process), the hung trial's --timeout
comes from how long a healthy trial took on this machine, and every other deadline is a
safety net against a broken product, far above what a working one needs, that says what
never came.
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
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from autotune.config import RunConfig
from autotune.measure import measure
from autotune.tune.study import Study
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
PROCESS_FAULTS = {n: f for n, f in FAULTS.items() if ":" in f[0]}  # no mount rights needed
# Safety nets only (see the module docstring). A trial's --timeout where no trial may ever
# reach it; how long anything (start-up, a trial, a resumed search) may take before the
# product counts as broken; how long the reaper may take to end a trial whose driver died.
SAFE_TIMEOUT_S = 600
EVENT_DEADLINE_S = 600.0
# Shorter than the least a stranded process lives on by itself here (a rank asleep in an
# injected hang for an hour, its peer blocked on it for gloo's 30-minute timeout, a frozen
# process for ever), so an orphan is still there when it expires.
ORPHAN_DEADLINE_S = 120.0
POLL_S = 0.1


@pytest.fixture(autouse=True)
def _no_strays(tmp_path: Path) -> Iterator[None]:
    """A failed test's stranded processes (a hung rank, a frozen one) are ended with it, so
    they neither hold the machine nor fail the next test's process checks."""
    yield
    for proc in _live_under(tmp_path):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _live_under(path: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``path`` (every trial's ranks, launcher and
    reaper name their trial folder; the driver names the run folder)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(
                    str(path) in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _processes_under(path: Path) -> list[str]:
    return [" ".join(p.info["cmdline"]) for p in _live_under(path)]


def _wait_no_processes(path: Path, within_s: float = ORPHAN_DEADLINE_S) -> list[str]:
    """What is still running under ``path`` once nothing is, or at the deadline. Callers make
    sure that whatever could be left cannot end on its own (see ORPHAN_DEADLINE_S): a
    generous wait then passes only if the product ended it, however slow the machine."""
    deadline = time.monotonic() + within_s
    while (left := _processes_under(path)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return left


def _driver(tmp_path: Path, out: Path, budget: int, *extra: str) -> list[str]:
    wl = tmp_path / "workload.yaml"
    if not wl.exists():
        wl.write_text(yaml.safe_dump(WORKLOAD))
    # --budget-s: these searches end on their trial budget; the default of 480 s of measuring
    # would end one early on a slow machine. --confirm 0: the faults are the search's; the
    # finalists' re-measurement (tests/cli/test_confirm.py) would only lengthen each run.
    return [sys.executable, "-m", "autotune", "run", "--workload", str(wl), "--out", str(out),
            "--budget-trials", str(budget), "--steps", "1", "--warmup", "1", "--models", "prior",
            "--budget-s", "86400", "--confirm", "0", *extra]


# -m slow (1.5 minutes, eight 2-rank trials and a hang): make test checks each fault's
# recording one trial at a time (tests/train/test_measure.py, tests/profilers/test_isolation.py)
# and the search's survival of a killed driver below.
@pytest.mark.slow
def test_a_search_survives_a_fault_in_every_trial(tmp_path: Path, tmpfs) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    env = {**os.environ, "AUTOTUNE_FAULT": ",".join(
        spec for spec, _, _ in FAULTS.values() if ":" in spec)}
    # The run's first trial (the untuned baseline) before the faulty folders exist: `--out`
    # takes an empty folder or a run to continue, and continuing is what happens next.
    start = time.monotonic()
    first = subprocess.run(_driver(tmp_path, out, 1, "--timeout", str(SAFE_TIMEOUT_S)), env=env,
                           capture_output=True, text=True, timeout=EVENT_DEADLINE_S)
    healthy_run_s = time.monotonic() - start
    assert first.returncode == 0, first.stderr[-3000:]
    faults = _arm_folder_faults(out, tmpfs)

    # --timeout, what the hung trial costs, from this machine's own speed: the run above was
    # start-up, one healthy trial and the report, so a trial alone (healthy, or failing at
    # its step 1 or 2) takes about half of it; 1.25x it (about 2.5x a trial on an idle
    # machine) lets the machine slow down or a config be heavier without any trial but the
    # hung one being timed out, and the hang still ends.
    hang_timeout_s = 1.25 * healthy_run_s
    done = subprocess.run(_driver(tmp_path, out, 8, "--timeout", f"{hang_timeout_s:.1f}"),
                          env=env, capture_output=True, text=True,
                          timeout=EVENT_DEADLINE_S + 8 * hang_timeout_s)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    trials = Study(f"sqlite:///{out / 'study.db'}").trials()
    assert [t.n for t in trials] == list(range(8))  # the search went on after every fault
    survived = 0
    for t in trials:
        if t.n not in faults:
            assert t.ok, (t.n, t.measurement.reason, t.measurement.log_tail, hang_timeout_s)
            continue
        spec, status, words = faults[t.n]
        m = t.measurement
        assert m.status is status and words in m.reason, (t.n, m.status, m.reason)
        if ":" in spec:  # a process fault: the log says what happened
            assert m.log_tail, (t.n, m.reason)
        survived += 1
    assert survived == len(faults)
    # 5 and 6, when armed: said, not fatal
    assert done.stderr.count("folder not written") == len(faults) - len(PROCESS_FAULTS)
    tuned = RunConfig.model_validate(yaml.safe_load((out / "tuned.yaml").read_text()))
    best = max((t for t in trials if t.ok), key=lambda t: t.measurement.tokens_per_s)
    assert tuned.model_dump_json() == best.rc.model_dump_json()
    # Each faulty trial left, if not ended, a process that cannot end on its own (the hung
    # rank, or a healthy rank blocked on its dead peer): see ORPHAN_DEADLINE_S.
    assert _wait_no_processes(tmp_path) == []


def _arm_folder_faults(out: Path, tmpfs) -> dict:  # noqa: ANN001
    """Trial 5's folder a read-only file system, trial 6's a full one; the faults armed.
    Mounting needs root: without the right the process faults still run, and a warning says
    which faults were left out."""
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(tmpfs(out / "trials" / "005"))],
                       check=True)
        tmpfs(out / "trials" / "006")
    except pytest.skip.Exception as why:
        warnings.warn(f"folder faults (trials 5 and 6) not armed: {why}", stacklevel=2)
        return PROCESS_FAULTS
    (out / "trials" / "006" / "fill").write_bytes(b"\0" * 64 * 1024)  # every page taken
    return FAULTS


def test_a_trial_over_the_memory_cap_is_oom(tmp_path: Path) -> None:
    wl = {**WORKLOAD, "budget": {**WORKLOAD["budget"], "memory_cap_gb": 0.05},
          "hardware": {"device": "cpu", "devices_per_node": 1}}
    rc = RunConfig.model_validate({"workload": wl, "schedule": {"policy": "pack",
                                                                "micro_batch_tokens": 128}})
    # The trial hangs before its first step: however fast the machine, it cannot end before
    # the cap is checked, and anything of it left running afterwards would stay.
    m = measure(rc, steps=1, warmup=1, timeout_s=SAFE_TIMEOUT_S, workdir=tmp_path / "t",
                env={"AUTOTUNE_FAULT": "hang:rank=0:step=1"})
    assert m.status is Status.OOM, (m.status, m.reason)
    assert "exceeded the 51.2 MiB cap" in m.reason
    assert _wait_no_processes(tmp_path) == []


# What each of the 10 kills waits for, seeded order. The first run is killed in its start-up
# as soon as its study exists (a run killed there was once refused by the same command: its
# study came before run.json); the other nine are shuffled.
# Each event is a state that lasts once reached (a file, a record, a process of a trial that
# cannot finish, see _hang_from), so no poll misses it and the kill lands where it was meant
# to at any speed.
FIRST_KILL = "study-created"
KILLS = ["ranks-running"] * 3 + ["trial-starting"] * 2 + [
    "recorded-then-ranks", "recorded", "result-written", "study-open"]
RECORDS = {"recorded", "recorded-then-ranks"}  # trial k is recorded before the kill
COMPLETES = RECORDS | {"result-written"}  # trial k must finish


# make test kills the driver once at each kind of moment that matters most (mid-trial,
# between a result and its record, after a record); -m slow runs all ten.
FOUR_KILLS = ["ranks-running", "result-written", "recorded-then-ranks"]


@pytest.mark.parametrize("kills", [pytest.param(KILLS, id="ten", marks=pytest.mark.slow),
                                   pytest.param(FOUR_KILLS, id="four")])
def test_sigkills_of_the_driver_lose_and_repeat_nothing(tmp_path: Path, kills: list[str]) -> None:
    # 4: the three kills that let a trial finish need trials 0-3 at most in any order, and
    # the resume measures at least one more.
    out, budget = tmp_path / "run", 4
    argv = _driver(tmp_path, out, budget, "--timeout", str(SAFE_TIMEOUT_S))
    db = out / "study.db"
    rng = np.random.default_rng(10)
    events = [FIRST_KILL, *(str(e) for e in rng.permutation(kills))]
    seen: list[str] = []
    kills_mid_trial = 0
    for i, event in enumerate(events):
        k = len(seen)  # the trial this run measures first
        stderr = tmp_path / f"driver-{i}.err"
        kills_mid_trial += _kill_on(event, argv, out, k, _hang_from(event, k, budget), stderr)
        # Every trial the run could have had running was armed to hang (or frozen): an orphan
        # would outlive ORPHAN_DEADLINE_S, so only the reaper can make this pass.
        left = _wait_no_processes(tmp_path)
        assert left == [], f"processes outlived the killed driver ({event}, kill {i}): {left}"
        now = _recorded(db, run_ended=True)
        assert now[:len(seen)] == seen, f"a completed measurement was lost ({event}, kill {i})"
        assert len(now) == len(set(now)), f"a measurement was repeated ({event}, kill {i})"
        seen = now
    assert len(seen) >= sum(e in RECORDS for e in events), "a recorded trial went missing"
    assert kills_mid_trial >= 3, "too few kills landed inside a trial to test the reaper"
    env = {name: v for name, v in os.environ.items() if name != "AUTOTUNE_FAULT"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=EVENT_DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    final = _recorded(db)
    assert final[:len(seen)] == seen
    assert len(final) == budget == len(set(final))
    assert [t.n for t in Study(f"sqlite:///{db}").trials()] == list(range(budget))
    # Healthy trials only in this last run: this says nothing is stuck, the kills above
    # are what test orphans.
    assert _wait_no_processes(tmp_path) == []


def _hang_from(event: str, k: int, budget: int) -> str:
    """AUTOTUNE_FAULT for a run whose first trial is ``k``: every trial from the first one the
    event does not need completed hangs at step 2, so a trial running at the kill cannot end
    on its own, and no more trials complete than the event waits for."""
    first = k + 1 if event in COMPLETES else k
    return ",".join(f"hang:rank=1:step=2:trial={n}" for n in range(first, budget))


def _kill_on(event: str, argv: list[str], out: Path, k: int, faults: str, stderr: Path) -> bool:
    """Starts the driver, SIGKILLs it (it alone) once ``event`` happened; whether ranks were
    running at the kill."""
    stale = _stat(out / "trials" / f"{k:03d}" / "metrics.json")  # an earlier run's result
    with open(stderr, "w") as err:
        proc = subprocess.Popen(argv, env={**os.environ, "AUTOTUNE_FAULT": faults},
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        _await(event, _waiter(proc, stderr, event), proc, out, k, stale)
        ranks = any(_role(p) == "rank" for p in _live_under(out))
    finally:
        proc.send_signal(signal.SIGKILL)  # the driver only: its trial is in another session
        proc.wait()
    return ranks


def _await(event: str, wait: Callable[[str, Callable[[], bool]], None],
           proc: subprocess.Popen, out: Path, k: int, stale: tuple[int, int] | None) -> None:
    db, result = out / "study.db", out / "trials" / f"{k:03d}" / "metrics.json"
    if event == "study-created":
        wait("the study created (study.db)", db.exists)
    elif event == "study-open":
        wait("the study opened by the driver", lambda: _has_open(proc, db))
    elif event == "trial-starting":
        wait(f"trial {k}'s reaper started", lambda: bool(_trial(out, k, "reaper")))
    elif event == "ranks-running":
        wait(f"trial {k}'s 2 ranks running", lambda: len(_trial(out, k, "rank")) == 2)
    elif event in ("recorded", "recorded-then-ranks"):
        wait(f"trial {k} recorded", lambda: len(_recorded(db)) > k)
        if event == "recorded-then-ranks":
            wait(f"trial {k + 1}'s 2 ranks running",
                 lambda: len(_trial(out, k + 1, "rank")) == 2)
    elif event == "result-written":
        wait(f"trial {k}'s result written", lambda: _stat(result) not in (None, stale))
        _freeze(out, k)
    else:
        raise AssertionError(f"unknown kill event {event!r}")


def _waiter(proc: subprocess.Popen, stderr: Path, event: str
            ) -> Callable[[str, Callable[[], bool]], None]:
    """A wait for a state of the run ``proc``, failing, with what never came, if the driver
    exits first or the product is broken (EVENT_DEADLINE_S)."""
    def wait(what: str, happened: Callable[[], bool]) -> None:
        deadline = time.monotonic() + EVENT_DEADLINE_S
        while not happened():
            assert proc.poll() is None, (f"the driver exited ({proc.returncode}) before "
                                         f"{what} ({event}): {stderr.read_text()[-3000:]}")
            assert time.monotonic() < deadline, (f"{what} ({event}) never happened within "
                                                 f"{EVENT_DEADLINE_S:.0f} s")
            time.sleep(POLL_S)
    return wait


def _role(proc: psutil.Process) -> str:
    """reaper, launcher (torchrun) or rank, for a process of a trial; else other."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "gone"
    if any(part.endswith("reaper.py") for part in cmd):
        return "reaper"
    if "torch.distributed.run" in cmd:
        return "launcher"
    return "rank" if "autotune.train.worker" in cmd else "other"


def _trial(out: Path, n: int, role: str) -> list[psutil.Process]:
    return [p for p in _live_under(out / "trials" / f"{n:03d}") if _role(p) == role]


def _has_open(proc: subprocess.Popen, path: Path) -> bool:
    try:
        return any(Path(f.path) == path.resolve() for f in psutil.Process(proc.pid).open_files())
    except psutil.Error:
        return False


def _stat(path: Path) -> tuple[int, int] | None:
    with contextlib.suppress(FileNotFoundError):
        st = path.stat()
        return st.st_ino, st.st_mtime_ns
    return None


def _freeze(out: Path, n: int) -> None:
    """SIGSTOPs what is left of trial ``n`` but its reaper. The trial wrote its result and is
    ending by itself: frozen, an orphan of it would stay for ever, where running it would end
    and pass the process check whether or not the reaper works. Its tree is complete by then
    (the ranks started long before), and the next trial, if the driver gets to it, hangs."""
    stopped: set[int] = set()
    while todo := [p for p in _live_under(out / "trials" / f"{n:03d}")
                   if p.pid not in stopped and _role(p) in ("launcher", "rank")]:
        for p in todo:
            with contextlib.suppress(psutil.Error):
                p.suspend()
            stopped.add(p.pid)


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
        # short beats, so the resumed worker need not wait 30 s to retake it. Only one worker
        # is alive at a time, so a beat late on a loaded machine cannot hand a live claim to
        # another; the values only shorten the resumed worker's wait.
        argv[argv.index("run")] = "worker"
        at = argv.index("--confirm")
        del argv[at:at + 2]  # a worker measures no finalists
        argv += ["--heartbeat", "1", "--grace", "2"]
    # Each replayed trial takes at least the delay, so the run records its 8 trials no faster
    # than one per 0.5 s however fast the machine (a slow one only widens the gaps): the test
    # has 3 s after the 2nd record to see it and stop the run, one cheap poll, then all the
    # time it needs to fill the disk.
    env = {**os.environ, "AUTOTUNE_REPLAY_DELAY_S": "0.5"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + EVENT_DEADLINE_S
        while len(_recorded(db_dir / "study.db")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(POLL_S)
        proc.send_signal(signal.SIGSTOP)
        with open(db_dir / "fill", "wb", buffering=0) as fh, contextlib.suppress(OSError):
            while fh.write(b"\0" * 4096):  # every page left, until ENOSPC
                pass
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=EVENT_DEADLINE_S)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("autotune: error:")]
    assert len(errors) == 1 and "database or disk is full" in errors[0], err[-3000:]
    assert "Traceback" not in err
    (db_dir / "fill").unlink()
    kept = _recorded(db_dir / "study.db", run_ended=True)
    assert 2 <= len(kept) < 8
    # No delay: nothing races the resumed run.
    env.pop("AUTOTUNE_REPLAY_DELAY_S")
    done = subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=EVENT_DEADLINE_S)
    # Exit 1 here means only that no candidate completed: the table holds none.
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr[-3000:]
    final = _recorded(db_dir / "study.db")
    assert final[:len(kept)] == kept and len(final) == 8 == len(set(final))


def _recorded(db: Path, *, run_ended: bool = False) -> list[str]:
    """The configs recorded in a run's SQLite study, in order, read as plain SQL: opening it
    through Optuna would create its tables, racing the run that is creating them, or finish
    a half-created study that the next run must cope with by itself. ``run_ended``: no run
    is alive, and a write a kill interrupted may have left its journal; read-only, SQLite
    could not roll it back and would refuse to read, so the file is opened writable and
    SQLite rolls the write back, as the next run would."""
    if not db.exists():
        return []
    mode = "rw" if run_ended else "ro"
    # The busy timeout is a safety net: a live run holds its write lock for milliseconds.
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode={mode}", uri=True,
                                            timeout=EVENT_DEADLINE_S)) as con:
        try:
            rows = con.execute(
                "SELECT a.value_json FROM trial_user_attributes a JOIN trials t "
                "ON a.trial_id = t.trial_id WHERE a.key = 'config_json' ORDER BY t.number"
            ).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return []  # the run has not created its tables yet
    return [json.loads(v) for (v,) in rows]
