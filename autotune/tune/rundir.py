"""The run directory: everything a tuning run produced, one folder per measured trial."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from autotune.config import RunConfig, Workload, dump_yaml
from autotune.errors import UserError
from autotune.tune.study import Trial
from profilers.store import atomic_write_text

__all__ = ["RunDir", "validate_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_name(name: str, what: str = "run name") -> str:
    """Names become folder names: letters, digits, '.', '_' and '-', no path tricks."""
    if not _NAME.match(name) or ".." in name:
        raise UserError(f"{what} {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
                        f"starting with a letter or digit")
    return name


class RunDir:
    """``workload.yaml``, ``tuned.yaml``, ``report.md``, ``summary.json``,
    ``trials/<n>/{config.yaml, metrics.json, log.txt}`` and ``confirm/``; every file
    written atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, root: Path, label: str) -> RunDir:
        run_id = validate_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{label}")
        path = Path(root) / run_id
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path(root) / f"{run_id}-{suffix}"
        path.mkdir(parents=True)
        return cls(path)

    def trial_path(self, n: int, study: str = "measured") -> Path:
        """Trial ``n``'s folder, not created: ``measure`` creates it, and a folder it cannot
        create is that trial's failure, not the run's. The baselines' trials, numbered in
        a study of their own, go to ``b<n>``."""
        return self.path / "trials" / f"{'' if study == 'measured' else study[0]}{n:03d}"

    def confirm_path(self, r: int, finalist: str) -> Path:
        """Round ``r``'s re-measurement of a finalist, after the search."""
        return self.path / "confirm" / f"r{r + 1}-{re.sub(r'[^A-Za-z0-9]+', '-', finalist)}"

    def write_workload(self, workload: Workload) -> None:
        atomic_write_text(self.path / "workload.yaml", dump_yaml(workload))

    def write_trial(self, trial: Trial, study: str = "measured") -> None:
        """The trial's folder copy of what the study holds."""
        d = self.trial_path(trial.n, study)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "config.yaml", dump_yaml(trial.rc))
        atomic_write_text(d / "metrics.json",
                          json.dumps(trial.measurement.to_json_dict(), indent=2))

    def write_tuned(self, rc: RunConfig) -> None:
        atomic_write_text(self.path / "tuned.yaml", dump_yaml(rc))

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)
