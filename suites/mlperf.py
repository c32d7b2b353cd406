"""MLPerf Training logs for the project's benchmarks, and their compliance check.

A run's log is written through the real ``mlperf_logging.mllog`` (``:::MLLOG {json}`` lines)
and checked by the package's own compliance checker against the project's rules
(``suites/compliance/``), since MLPerf's closed-benchmark rules reject names like
``autotune-smoke``::

    log = BenchLog(Path("run0.log"), benchmark="autotune-smoke")
    log.submission(platform="2xEPYC-cpu")
    log.init_start(); ...; log.init_stop(); log.run_start()
    ...
    log.run_stop(status="success", samples_count=4096)
    passed, output = check_log(Path("run0.log"))
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mlperf_logging.mllog import constants as mlc
from mlperf_logging.mllog.mllog import MLLogger

RULES: Path = Path(__file__).resolve().parent / "compliance" / "autotune_training_6.0.0.yaml"
RULESET = "6.0.0"
BENCHMARK_PREFIX = "autotune-"
CHECK_TIMEOUT_S = 120.0
_STATUSES = (mlc.SUCCESS, mlc.ABORTED)
_TOKEN = ":::MLLOG "

# Resolved path -> the BenchLog now writing it. A later BenchLog on the same path starts the
# file over and closes the earlier one, so two handlers never write one file.
_OPEN: dict[Path, BenchLog] = {}


class BenchLog:
    """One run's MLPerf log. Writes only when rank0 is True (other ranks get a no-op object).

    Each BenchLog has its own ``MLLogger`` over a private ``logging.Logger`` with one file
    handler, rather than ``mllog.config(filename=...)``: that adds a handler to the single
    process-wide mllogger, so a second run in the same process would write every line into
    both files (and echo it to stdout). The file is truncated on open: it holds one run.
    ``run_stop`` closes it; logging after that raises ``ValueError``.

    Args:
        path: the log file.
        benchmark: ``submission_benchmark``; refused unless it starts with ``autotune-``,
            which the rules require.
        rank0: whether this process writes (MLPerf logs come from one rank).
    """

    def __init__(self, path: Path, *, benchmark: str, rank0: bool = True) -> None:
        if not benchmark.startswith(BENCHMARK_PREFIX):
            raise ValueError(f"benchmark={benchmark!r} does not start with {BENCHMARK_PREFIX!r}")
        self.path = Path(path).resolve()
        self.benchmark = benchmark
        self._mllogger: MLLogger | None = None
        self._handler: logging.FileHandler | None = None
        if not rank0:
            return
        previous = _OPEN.get(self.path)
        if previous is not None:
            previous.close()
        self._handler = logging.FileHandler(self.path, mode="w", encoding="utf-8")
        logger = logging.Logger(f"autotune.mlperf:{self.path}", level=logging.INFO)
        logger.propagate = False
        logger.addHandler(self._handler)
        # Offset 3 skips _log and the public method, so each line's metadata names the
        # runner's call site, not this module.
        self._mllogger = MLLogger(logger=logger, default_stack_offset=3)
        _OPEN[self.path] = self

    def close(self) -> None:
        """Close the file; later calls raise. A no-op on other ranks and when already closed."""
        if self._handler is None:
            return
        self._handler.close()
        self._handler = None
        if _OPEN.get(self.path) is self:
            del _OPEN[self.path]

    def _log(self, kind: str, key: str, value: Any = None, metadata: dict[str, Any] | None = None) -> None:
        if self._mllogger is None:
            return
        if self._handler is None:
            raise ValueError(f"MLPerf log {self.path} is closed (run_stop logged or reopened)")
        getattr(self._mllogger, kind)(key=key, value=value, metadata=metadata)

    def submission(
        self, *, org: str = "autotune", division: str = "open", status: str = "onprem", platform: str
    ) -> None:
        for key, value in (
            (mlc.SUBMISSION_BENCHMARK, self.benchmark),
            (mlc.SUBMISSION_ORG, org),
            (mlc.SUBMISSION_DIVISION, division),
            (mlc.SUBMISSION_STATUS, status),
            (mlc.SUBMISSION_PLATFORM, platform),
        ):
            self._log("event", key, value)

    def init_start(self) -> None:
        self._log("start", mlc.INIT_START)

    def init_stop(self) -> None:
        self._log("end", mlc.INIT_STOP)

    def run_start(self) -> None:
        self._log("start", mlc.RUN_START)

    def hyperparameters(
        self,
        *,
        global_batch_size: int,
        gradient_accumulation_steps: int,
        seed: int,
        learning_rate: float,
        tensor_parallelism: int = 1,
        pipeline_parallelism: int = 1,
        context_parallelism: int = 1,
        max_sequence_length: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Log each hyperparameter as its own event; ``extra`` adds keys outside MLPerf's list."""
        params: dict[str, Any] = {
            mlc.GLOBAL_BATCH_SIZE: global_batch_size,
            mlc.GRADIENT_ACCUMULATION_STEPS: gradient_accumulation_steps,
            mlc.SEED: seed,
            mlc.OPT_BASE_LR: learning_rate,
            mlc.TENSOR_PARALLELISM: tensor_parallelism,
            mlc.PIPELINE_PARALLELISM: pipeline_parallelism,
            mlc.CONTEXT_PARALLELISM: context_parallelism,
        }
        if max_sequence_length is not None:
            params[mlc.MAX_SEQUENCE_LENGTH] = max_sequence_length
        clash = sorted(set(params) & set(extra or {}))
        if clash:
            # A second line for a key the rules want EXACTLY_ONE of fails the check.
            raise ValueError(f"extra repeats logged hyperparameters: {clash}")
        for key, value in {**params, **(extra or {})}.items():
            self._log("event", key, value)

    def train_samples(self, n: int) -> None:
        self._log("event", mlc.TRAIN_SAMPLES, n)

    def eval_samples(self, n: int) -> None:
        self._log("event", mlc.EVAL_SAMPLES, n)

    def block_start(self, *, samples_count: int) -> None:
        self._log("start", mlc.BLOCK_START, samples_count, {mlc.SAMPLES_COUNT: samples_count})

    def block_stop(self, *, samples_count: int) -> None:
        self._log("end", mlc.BLOCK_STOP, samples_count, {mlc.SAMPLES_COUNT: samples_count})

    def eval_start(self, *, samples_count: int) -> None:
        self._log("start", mlc.EVAL_START, samples_count, {mlc.SAMPLES_COUNT: samples_count})

    def eval_stop(self, *, samples_count: int) -> None:
        self._log("end", mlc.EVAL_STOP, samples_count, {mlc.SAMPLES_COUNT: samples_count})

    def eval_accuracy(self, value: float, *, samples_count: int) -> None:
        """Log the quality metric; here the held-out eval loss (lower is better)."""
        self._log("event", mlc.EVAL_ACCURACY, value, {mlc.SAMPLES_COUNT: samples_count})

    def run_stop(self, *, status: str, samples_count: int) -> None:
        """End the run (``success`` or ``aborted``, e.g. at its time limit) and close the file."""
        if status not in _STATUSES:
            raise ValueError(f"status={status!r} is not one of {_STATUSES}")
        self._log("end", mlc.RUN_STOP, None, {mlc.STATUS: status, mlc.SAMPLES_COUNT: samples_count})
        self.close()


def parse_log(path: Path) -> list[dict[str, Any]]:
    """The ``:::MLLOG`` records of a log, in order; other lines are skipped, as the checker does.

    Raises:
        ValueError: a ``:::MLLOG`` line whose payload is not JSON, with its line number.
    """
    records = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        start = line.find(_TOKEN)
        if start < 0:
            continue
        try:
            records.append(json.loads(line[start + len(_TOKEN) :]))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not an MLLOG record ({err}): {line!r}") from err
    return records


def check_log(path: Path) -> tuple[bool, str]:
    """Run the package's compliance checker on ``path`` against :data:`RULES`.

    ``--werror`` because the checker only warns when an EXACTLY_ONE key repeats with the same
    value, so a log with every line doubled (two handlers on one file) would otherwise pass.
    Its own log file goes to the null device rather than ``./compliance_checker.log``.

    Returns:
        Whether it passed, and the last 4000 characters of its output.
    """
    # RULES is absolute: the checker joins --config onto its own package folder.
    cmd = [sys.executable, "-m", "mlperf_logging.compliance_checker", "--config", str(RULES)]
    cmd += ["--usage", "training", "--ruleset", RULESET, "--werror", "--log_output", os.devnull]
    cmd.append(str(Path(path).resolve()))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        return False, f"compliance checker timed out after {err.timeout:.0f} s: {' '.join(cmd)}"
    return proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
