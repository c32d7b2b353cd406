"""Scale-out search: any number of ``autotune worker`` processes, on any number of machines,
share one Optuna study and together measure every candidate the search wants exactly once.

Workers coordinate through the study alone. A worker *claims* a candidate by creating a
RUNNING trial whose ``claim`` attribute is the config's key, and it decides what to claim
while it holds the study's claim lock (a PostgreSQL advisory lock; a file lock for SQLite,
which is one machine's storage), so no two workers see the same candidate as free. The
measurement is written into the claiming trial, which becomes COMPLETE or FAIL and holds
the study's one encoding of a trial (``autotune.tune.study.encode``), so ``Study.trials()``
reads a shared study as it reads a single-process one.

A worker beats Optuna's heartbeat while it measures. A claim whose worker died (its
heartbeat older than the grace period) is failed by the next worker that claims
(``optuna.storages.fail_stale_trials``); a FAIL trial without a measurement holds no claim,
so its candidate is free again. A worker that was only slow finds its claim failed when it
reports and drops its measurement, which someone else is retaking.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from autotune.config import RunConfig
from autotune.errors import UserError
from autotune.tune.strategies import Strategy
from autotune.tune.study import Pick, Study, Trial, config_key, decode, encode, open_error, value_of
from profilers.records import Measurement

__all__ = ["Claim", "SharedStudy", "next_pick", "work"]

log = logging.getLogger(__name__)

CLAIM = "claim"


@dataclass(frozen=True, slots=True)
class Claim:
    trial_id: int
    n: int
    pick: Pick


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The study as a worker sees it under the claim lock."""

    done: list[Trial]  # measured, COMPLETE or FAIL, in claim order
    running: set[str]  # config keys claimed by a live worker


class SharedStudy(Study):
    """One study in an Optuna RDB storage, shared by every worker that opens it."""

    def __init__(self, storage: str, study_name: str = "measured", *, heartbeat_s: int = 10,
                 grace_s: int | None = None) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            self._lock = _claim_lock(storage, study_name)
            # Under the lock: workers opening a fresh database at once would race on
            # Optuna's CREATE TABLEs (a unique violation in PostgreSQL's catalog).
            with self._lock(), _quiet_experimental():
                self.storage = optuna.storages.RDBStorage(
                    storage, heartbeat_interval=heartbeat_s,
                    grace_period=grace_s or 3 * heartbeat_s)
                self.study = optuna.create_study(storage=self.storage, study_name=study_name,
                                                 direction="maximize", load_if_exists=True)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any storage failure is bad input here
            raise open_error(storage, exc) from None
        self.url, self.name = storage, study_name
        self.heartbeat_s = heartbeat_s
        self.worker = f"{socket.gethostname()}-{os.getpid()}"  # who holds a claim, for people

    def snapshot(self) -> Snapshot:
        from optuna.trial import TrialState

        done, running = [], set()
        for t in self.study.get_trials(deepcopy=False):
            attrs = t.user_attrs
            if t.state is TrialState.RUNNING and CLAIM in attrs:
                running.add(attrs[CLAIM])
            elif (trial := decode(attrs)) is not None:
                done.append(trial)
        return Snapshot(sorted(done, key=lambda t: t.n), running)

    def claim(self, choose: Callable[[Snapshot], Pick | None]) -> Claim | None:
        """Claim what ``choose`` picks from the study as it stands, or None when it picks
        nothing; dead workers' claims are released first."""
        import optuna

        with self._lock():
            with _quiet_experimental():
                optuna.storages.fail_stale_trials(self.study)
            pick = choose(self.snapshot())
            if pick is None:
                return None
            frozen = optuna.trial.create_trial(
                state=optuna.trial.TrialState.RUNNING, params={}, distributions={},
                user_attrs={CLAIM: config_key(pick.rc), "config": pick.rc.label(),
                            "worker": self.worker})
            trial_id = self.storage.create_new_trial(self.study._study_id, template_trial=frozen)
            # Beat at once, under the lock: a trial that never beat is never stale, so a
            # worker dying before its first beat would hold its claim for ever. This leaves
            # only the milliseconds between these two commits.
            self.storage.record_heartbeat(trial_id)
            number = self.storage.get_trial_number_from_id(trial_id)
        return Claim(trial_id, number, pick)

    @contextmanager
    def beating(self, claim: Claim) -> Iterator[None]:
        """Optuna's heartbeat for ``claim`` while the body measures."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                try:
                    self.storage.record_heartbeat(claim.trial_id)
                except Exception as exc:  # noqa: BLE001 - a blip must not end the beats
                    # Missed beats past the grace period release the claim, and finish()
                    # then drops this measurement: late, never double-counted.
                    log.warning("heartbeat of trial %d failed (%s); retrying",
                                claim.n, type(exc).__name__)

        thread = threading.Thread(target=beat, name=f"heartbeat-{claim.trial_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def finish(self, claim: Claim, measurement: Measurement) -> Trial | None:
        """Write ``measurement`` into the claim; None when the claim was released meanwhile
        (this worker was taken for dead: another one measures the candidate again)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        pick = claim.pick
        trial = Trial(claim.n, pick.rc, measurement, pick.predicted_tokens_per_s,
                      pick.predicted_peak_mem_bytes)
        value = value_of(trial)
        try:
            if self.storage.get_trial(claim.trial_id).state is not TrialState.RUNNING:
                return None
            for attr, setting in encode(trial).items():
                self.storage.set_trial_user_attr(claim.trial_id, attr, setting)
            self.storage.set_trial_state_values(
                claim.trial_id, TrialState.FAIL if value is None else TrialState.COMPLETE,
                None if value is None else [float(value)])
        except UpdateFinishedTrialError:
            return None
        return trial


@contextmanager
def _quiet_experimental() -> Iterator[None]:
    # Optuna marks its heartbeat API experimental (since 2.9); we rely on it knowingly, and
    # a warning per claim would bury the worker's own output.
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _claim_lock(url: str, study_name: str) -> Callable[[], AbstractContextManager[None]]:
    """A lock every worker of the study takes to claim: an advisory lock on PostgreSQL (the
    server drops it with a dead worker's connection), a file lock beside an SQLite file."""
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    dialect = parsed.get_backend_name()
    if dialect == "postgresql":
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        key = zlib.crc32(f"autotune-claim/{study_name}".encode())

        @contextmanager
        def advisory() -> Iterator[None]:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()

        return advisory
    if dialect == "sqlite" and parsed.database and parsed.database != ":memory:":
        path = Path(parsed.database).resolve()

        @contextmanager
        def flock() -> Iterator[None]:
            with open(path.with_name(path.name + ".claim.lock"), "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

        return flock
    raise UserError(f"--storage {dialect}: workers share a study through PostgreSQL "
                    f"(postgresql://...) or, on one machine, an SQLite file")


def next_pick(strategy: Strategy, *, budget: int, first: RunConfig | None = None
              ) -> Callable[[Snapshot], Pick | None]:
    """The strategy's choice for a worker: ``first`` (the untuned baseline) before anything,
    then what the strategy asks for that nobody measured or claimed, until ``budget``
    claims."""

    def choose(snap: Snapshot) -> Pick | None:
        if len(snap.done) + len(snap.running) >= budget:
            return None
        taken = {t.key for t in snap.done} | snap.running
        if first is not None and config_key(first) not in taken:
            return Pick(first)
        picks = strategy.ask(snap.done, taken=snap.running)
        return picks[0] if picks else None

    return choose


def work(shared: SharedStudy, choose: Callable[[Snapshot], Pick | None],
         source: Callable[[RunConfig, int], Measurement], *, deadline: float | None = None,
         poll_s: float = 0.5, on_trial: Callable[[Trial], None] | None = None) -> list[Trial]:
    """Claim, measure and record until the search wants nothing more; then wait while
    other workers still hold claims (one may die and release its candidate). Returns the
    trials this worker measured."""
    mine: list[Trial] = []
    while deadline is None or time.monotonic() < deadline:
        claim = shared.claim(choose)
        if claim is None:
            if not shared.snapshot().running:
                break
            time.sleep(poll_s)
            continue
        with shared.beating(claim):  # until recorded: a live claim is never taken for dead
            trial = shared.finish(claim, source(claim.pick.rc, claim.n))
        if trial is not None:
            mine.append(trial)
            if on_trial is not None:
                on_trial(trial)
    return mine


def join(opts, *, study: str, heartbeat_s: int, grace_s: int | None, out: Path) -> dict:  # noqa: ANN001 - Options
    """``autotune worker``: this process's share of the study's measurements, chosen by the
    guided strategy as ``autotune run`` chooses them (the untuned baseline first), until
    the study's budget is claimed; what it measured and the study's best so far."""
    from autotune.tune.run import prepare, source_of, workload_of
    from autotune.tune.rundir import RunDir, validate_name
    from autotune.tune.strategies import make
    from autotune.tune.study import storage_errors

    # Study names reach the storage's tables and the reports' folder names alike.
    validate_name(study, "study name")
    wl, user = workload_of(opts)
    source = source_of(opts)
    # Before the models and the space: a storage out of reach is refused at once.
    shared = SharedStudy(opts.storage, study, heartbeat_s=heartbeat_s, grace_s=grace_s)
    setting = prepare(opts, wl, user)
    budget = opts.budget_trials or wl.budget.trials
    choose = next_pick(make("guided", setting.context(opts, budget)), budget=budget,
                       first=setting.baseline)
    folders = RunDir(out)
    deadline = time.monotonic() + opts.budget_s if opts.budget_s else None
    with storage_errors(opts.storage, "the shared study failed"):
        mine = work(shared, choose, lambda rc, n: source(rc, folders.trial_path(n), tag=str(n)),
                    deadline=deadline)
        done = shared.snapshot().done
    ok = [t for t in done if t.ok and t.measurement.tokens_per_s]
    best = max(ok, key=lambda t: t.measurement.tokens_per_s or 0.0) if ok else None
    return {"measured_here": [t.n for t in mine], "study_trials": len(done),
            "config": best.rc.label() if best else None,
            "tokens_per_s": best.measurement.tokens_per_s if best else None}
