"""The study: every measured trial of a tuning run, kept in an Optuna study (SQLite by
default, any RDB URL), one Optuna trial per measurement with the config and the measurement
as attributes. ``autotune run``, ``autotune worker`` and the baselines all read and write
trials through the one encoding here, so a study started by one is continued by another,
and optuna-dashboard can watch any of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from autotune.config import RunConfig
from autotune.errors import StorageFailure, UserError
from profilers.records import Measurement, Status

__all__ = ["Pick", "Study", "Trial", "config_key", "decode", "encode", "open_error",
           "storage_errors"]


def config_key(rc: RunConfig) -> str:
    """One spelling per config, stable across processes."""
    return rc.model_dump_json()


@dataclass(frozen=True, slots=True)
class Pick:
    """A config a strategy wants measured, with what the step model predicted for it."""

    rc: RunConfig
    predicted_tokens_per_s: float | None = None
    predicted_peak_mem_bytes: float | None = None


@dataclass
class Trial:
    n: int
    rc: RunConfig
    measurement: Measurement
    predicted_tokens_per_s: float | None = None
    predicted_peak_mem_bytes: float | None = None

    @property
    def ok(self) -> bool:
        return self.measurement.status is Status.COMPLETE

    @property
    def key(self) -> str:
        return config_key(self.rc)


def encode(trial: Trial) -> dict:
    """A trial as its Optuna user attributes. The space's knobs vary by policy, which
    Optuna's fixed distributions cannot hold: the config rides along as JSON, its label for
    the dashboard. ``config_json`` comes last: readers take a trial holding it as whole."""
    m = trial.measurement
    return {"n": trial.n, "config": trial.rc.label(), "measurement_json": m.model_dump_json(),
            "status": m.status.value, "predicted_tokens_per_s": trial.predicted_tokens_per_s,
            "predicted_peak_mem_bytes": trial.predicted_peak_mem_bytes,
            "config_json": trial.rc.model_dump_json()}


def decode(attrs: dict) -> Trial | None:
    """The trial an Optuna trial's attributes hold; None for one that holds no measurement
    (a worker's claim, a released claim)."""
    if "config_json" not in attrs:
        return None
    return Trial(int(attrs["n"]), RunConfig.model_validate_json(attrs["config_json"]),
                 Measurement.model_validate_json(attrs["measurement_json"]),
                 attrs.get("predicted_tokens_per_s"), attrs.get("predicted_peak_mem_bytes"))


def value_of(trial: Trial) -> float | None:
    """The Optuna objective of a trial: its tokens/s when it completed."""
    m = trial.measurement
    return float(m.tokens_per_s) if trial.ok and m.tokens_per_s is not None else None


@contextmanager
def storage_errors(storage: str, doing: str) -> Iterator[None]:
    """A storage failing mid-run (SQLite on a full disk, a PostgreSQL server gone) as one
    StorageFailure line instead of SQLAlchemy's traceback."""
    import optuna
    import sqlalchemy.exc

    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
        cause = exc.__cause__ or exc
        detail = (str(cause).splitlines() or [type(cause).__name__])[0]
        raise StorageFailure(f"{doing} in {without_password(storage)}: {detail}; what was "
                             f"recorded before is kept, and the same command resumes") from None


def without_password(url: str) -> str:
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL we cannot parse is shown as given
        return url


def open_error(storage: str, exc: Exception) -> UserError:
    """Any failure to open a study is bad input: one line naming the storage."""
    detail = str(exc).splitlines()[0] if str(exc) else "no detail"
    return UserError(f"--storage {without_password(storage)}: cannot open the study "
                     f"({type(exc).__name__}: {detail})")


class Study:
    """Measured trials in one Optuna study: ``add`` writes one as soon as it completes (a
    kill loses nothing done), ``trials`` reads them back in order."""

    def __init__(self, storage: str, name: str = "measured") -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url, self.name = storage, name
        try:
            self.study = optuna.create_study(storage=storage, study_name=name,
                                             direction="maximize", load_if_exists=True)
        except Exception as exc:  # noqa: BLE001 - any storage failure is bad input here
            raise open_error(storage, exc) from None

    def trials(self) -> list[Trial]:
        with storage_errors(self.url, "cannot read the measured trials"):
            stored = self.study.get_trials(deepcopy=False)
        return sorted((t for t in map(decode, (s.user_attrs for s in stored)) if t),
                      key=lambda t: t.n)

    def next_number(self) -> int:
        """The number the next trial gets: Optuna's own numbering, which counts a worker's
        released claims too, so numbers stay unique in a study two drivers shared."""
        with storage_errors(self.url, "cannot read the measured trials"):
            return len(self.study.get_trials(deepcopy=False))

    def add(self, trial: Trial) -> None:
        import optuna

        value = value_of(trial)
        frozen = optuna.trial.create_trial(
            params={}, distributions={}, value=value, user_attrs=encode(trial),
            state=optuna.trial.TrialState.COMPLETE if value is not None
            else optuna.trial.TrialState.FAIL)
        with storage_errors(self.url, f"cannot record trial {trial.n}"):
            self.study.add_trial(frozen)
