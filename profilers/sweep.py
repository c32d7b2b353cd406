"""Run op-family cases in an isolated child, window by window, into a profile store.

Every case is timed in several windows, one per round over all cases, so that its windows
lie far apart in time: on a shared host the machine's speed drifts over seconds, and windows
taken back to back would all catch the same phase. The store keeps one record per window;
``profilers.ops.pool_windows`` pools them per case.

The child (``python -m profilers.ops``) announces each window before timing it, so that a
case that hangs past its timeout, crashes the process or exhausts memory is recorded with
that status against the right key and the sweep goes on in a fresh child. Records are
flushed to the store in small parts; a sweep that is killed loses at most the records not yet
flushed, and re-running measures exactly the windows the store does not hold (a failed case
is done: its failure is its result).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profilers.isolation import _classify, _log_tail, _ProcessTree, guarded
from profilers.ops import case_key, window_row
from profilers.records import Status
from profilers.store import ProfileStore

__all__ = ["SweepReport", "pending_jobs", "sweep"]

_FLUSH_ROWS = 16
_FLUSH_S = 10.0
_POLL_S = 0.25


@dataclass
class SweepReport:
    measured: int = 0  # window records this run added (failures included)
    skipped: int = 0  # window records already in the store
    failed: dict[str, int] = field(default_factory=dict)  # status -> count, this run
    remaining: int = 0  # windows left when the budget ran out
    wall_s: float = 0.0


def pending_jobs(cases: list[dict[str, Any]], store: ProfileStore,
                 windows: int) -> tuple[list[dict], int]:
    """The ``{case, window}`` jobs the store lacks, round by round (every case's window 0,
    then every case's window 1, ...), and how many windows it already holds. A case with a
    failed window is done: its failure is its result."""
    held: dict[str, set[str]] = {}
    failed: set[str] = set()
    for fam in {c["family"] for c in cases}:
        table = store.load(fam)
        held[fam] = set(table["key"]) if "key" in table else set()
        if "status" in table:
            failed |= set(table.loc[table.status != Status.COMPLETE.value, "case"])
    unique = list({case_key(c): c for c in cases}.items())
    jobs, skipped = [], 0
    for window in range(windows):
        for key, case in unique:
            if key in failed:
                continue
            if f"{key}/{window}" in held[case["family"]]:
                skipped += 1
            else:
                jobs.append({"case": case, "window": window})
    return jobs, skipped


def _job_key(job: dict[str, Any]) -> str:
    return f"{case_key(job['case'])}/{job['window']}"


class _Writer:
    """Buffers rows per family and writes them as store parts."""

    def __init__(self, store: ProfileStore) -> None:
        self.store, self.rows = store, defaultdict(list)
        self.last = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row["family"]].append(row)
        if sum(map(len, self.rows.values())) >= _FLUSH_ROWS or time.monotonic() - self.last > _FLUSH_S:
            self.flush()

    def flush(self) -> None:
        import pandas as pd

        for fam, rows in self.rows.items():
            if rows:
                self.store.append(fam, pd.DataFrame(rows))
        self.rows.clear()
        self.last = time.monotonic()


def sweep(cases: list[dict[str, Any]], store: ProfileStore, *, device_kind: str = "cpu",
          budget_s: float | None = None, case_timeout_s: float = 300.0,
          mem_cap_bytes: int | None = None, min_time_s: float = 0.05, windows: int = 3,
          attempts: int = 3, progress: bool = True) -> SweepReport:
    """Measure every window of every case that ``store`` lacks, within ``budget_s`` seconds.

    Each case gets ``windows`` timed windows of ``min_time_s``, a whole round of other cases
    apart; ``attempts``: how often a window disturbed by other processes is measured (see
    ``profilers.ops.measure_window``)."""
    from profilers.ops import canary_reference
    from profilers.progress import progress as progress_bar

    start = time.monotonic()
    todo, skipped = pending_jobs(cases, store, windows)
    # No canary on a GPU: there a small matmul times launch latency, not the profiled ops.
    ref = canary_reference(device_kind, store.fingerprint_key) if todo and device_kind == "cpu" \
        else None
    report = SweepReport(skipped=skipped)
    writer = _Writer(store)
    log_path = store.root / "sweep.log"
    bar = progress_bar(total=len(todo), desc="profiling", unit="window", enabled=progress)
    try:
        while todo:
            left = None if budget_s is None else budget_s - (time.monotonic() - start)
            if left is not None and left <= 0:
                break
            finished, failed = _run_child(
                todo, writer, bar, report, device_kind=device_kind, case_timeout_s=case_timeout_s,
                mem_cap_bytes=mem_cap_bytes, log_path=log_path, deadline_s=left,
                child_args=["--min-time-s", str(min_time_s), "--attempts", str(attempts),
                            *(["--canary-ref-s", str(ref)] if ref is not None else [])])
            todo = [j for j in todo if _job_key(j) not in finished
                    and case_key(j["case"]) not in failed]
    finally:
        writer.flush()
        bar.close()
    report.remaining = len(todo)
    report.wall_s = time.monotonic() - start
    return report


def _run_child(todo: list[dict], writer: _Writer, bar: Any, report: SweepReport, *,
               device_kind: str, case_timeout_s: float, mem_cap_bytes: int | None,
               child_args: list[str], log_path: Path, deadline_s: float | None
               ) -> tuple[set[str], set[str]]:
    """Run ``todo`` in one child until it ends, a window fails it, or the deadline passes;
    returns the job keys that now have a record, and the cases that failed."""
    cases_path = writer.store.root / f".jobs-{os.getpid()}.jsonl"
    cases_path.write_text("".join(json.dumps(j) + "\n" for j in todo))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    offset = log.tell()
    proc = subprocess.Popen(
        guarded([sys.executable, "-u", "-m", "profilers.ops", "--jobs", str(cases_path),
                 "--device", device_kind, *child_args]),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    tree = _ProcessTree(proc.pid)
    began = time.monotonic()
    finished: set[str] = set()
    failed_cases: set[str] = set()
    inflight: str | None = None
    inflight_since: float | None = None
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    failure: tuple[Status, str] | None = None
    try:
        while True:
            now = time.monotonic()
            if deadline_s is not None and now - began > deadline_s:
                return finished, failed_cases  # budget spent: the rest is for the next run
            if inflight_since is not None and now - inflight_since > case_timeout_s:
                failure = (Status.TIMEOUT, f"killed after {case_timeout_s:.0f} s case timeout")
                break
            if mem_cap_bytes is not None and tree.sample_rss() > mem_cap_bytes:
                failure = (Status.OOM, f"RSS exceeded the {mem_cap_bytes / 2**30:.1f} GiB cap")
                break
            if not sel.select(timeout=_POLL_S):
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:  # the child exited
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                if text.startswith("START "):
                    inflight, inflight_since = text[6:].strip(), time.monotonic()
                elif text.startswith("ROW "):
                    row = json.loads(text[4:])
                    writer.add(row)
                    if row["status"] != Status.COMPLETE.value:
                        report.failed[row["status"]] = report.failed.get(row["status"], 0) + 1
                        failed_cases.add(row["case"])
                    report.measured += 1
                    finished.add(row["key"])
                    inflight = inflight_since = None
                    bar.update(1)
    finally:
        sel.close()
        tree.terminate()
        returncode = proc.wait()
        log.close()
        cases_path.unlink(missing_ok=True)
    by_key = {_job_key(j): j for j in todo}
    if failure is None and inflight is not None and inflight not in finished:
        status, reason = _classify(returncode, _log_tail(log_path, offset))
        failure = (status if status is not Status.COMPLETE else Status.CRASHED, reason)
    if failure is not None and inflight is not None and inflight not in finished:
        job = by_key[inflight]
        writer.add(window_row(job["case"], job["window"],
                              {"status": failure[0].value, "error": failure[1][:300]}))
        report.failed[failure[0].value] = report.failed.get(failure[0].value, 0) + 1
        report.measured += 1
        bar.update(1)
        finished.add(inflight)
        failed_cases.add(case_key(job["case"]))
    elif not finished and todo:
        # The child died before announcing a window (e.g. at import): nothing to blame.
        _, reason = _classify(returncode, _log_tail(log_path, offset))
        raise RuntimeError(f"the profiling child exited before measuring anything: {reason}; "
                           f"see {log_path}")
    return finished, failed_cases
