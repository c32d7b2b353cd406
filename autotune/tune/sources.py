"""Where measurements come from: the real trainer (``LiveSource``), a recorded table
(``ReplaySource``, Kernel Tuner's simulation mode, for tests and benchmarks in seconds), or
trials a study already holds (``Recorded``, which answers them without measuring again).
Every driver of a study measures through a ``Source``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import pandas as pd

from autotune.config import RunConfig
from autotune.errors import UserError
from autotune.tune.study import Pick, Trial, config_key
from profilers.records import Measurement, Status

__all__ = ["LiveSource", "Recorded", "ReplaySource", "Source"]


class Source(Protocol):
    def __call__(self, rc: RunConfig, workdir: Path | None = None, *, tag: str = "",
                 repeat: int | None = None) -> Measurement:
        """``rc`` measured (its files in ``workdir``; ``tag`` names the trial to the
        trainer's fault hooks); ``repeat`` r: the r-th measurement of a config measured
        again after the search."""
        ...


class LiveSource:
    """The reference trainer, each trial in its own process tree. On GPUs a candidate is
    first traced at real size under fake tensors (``autotune memory``), and one traced over
    the cap is recorded as out of memory without running it."""

    def __init__(self, *, steps: int, warmup: int, timeout_s: float, memory_trace: bool = True,
                 on_phase: Callable[[str], None] | None = None) -> None:
        self.steps, self.warmup, self.timeout_s = steps, warmup, timeout_s
        self.memory_trace, self.on_phase = memory_trace, on_phase

    def __call__(self, rc: RunConfig, workdir: Path | None = None, *, tag: str = "",
                 repeat: int | None = None) -> Measurement:
        from autotune.measure import measure

        if self.memory_trace and repeat is None and rc.workload.hardware.device == "cuda":
            from autotune.memtrace import confirm_fits

            if self.on_phase is not None:
                self.on_phase(f"{rc.label()}: tracing its memory")
            refused = confirm_fits(rc)
            if refused is not None:
                return refused
        if self.on_phase is not None:
            self.on_phase(rc.label())
        return measure(rc, steps=self.steps, warmup=self.warmup, timeout_s=self.timeout_s,
                       workdir=workdir, env={"AUTOTUNE_TRIAL": tag} if tag else None)


class ReplaySource:
    """Measurements answered from recorded tables (``config_json`` + ``measurement_json``
    columns, as ``suites.step_dataset`` writes them); a config not in them is a CRASHED
    measurement saying so. A config recorded several times answers its repeats in turn."""

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.repeats: dict[str, list[Measurement]] = {}  # per config, in the table's order
        for path in map(Path, paths):
            try:
                frame = pd.read_parquet(path)
            except (OSError, ValueError) as exc:
                raise UserError(f"--replay {path}: not a measurements table ({exc})") from None
            for rec in frame.itertuples():
                key = config_key(RunConfig.model_validate_json(rec.config_json))
                self.repeats.setdefault(key, []).append(
                    Measurement.model_validate_json(rec.measurement_json))

    @property
    def table(self) -> dict[str, Measurement]:
        """The last recorded measurement of each config."""
        return {key: got[-1] for key, got in self.repeats.items()}

    def __call__(self, rc: RunConfig, workdir: Path | None = None, *, tag: str = "",
                 repeat: int | None = None) -> Measurement:
        got = self.repeats.get(config_key(rc))
        if not got:
            return Measurement(status=Status.CRASHED, reason="not in the replay table")
        if repeat is None:
            # Reliability tests stretch a replayed measurement to kill a run inside one.
            delay = float(os.environ.get("AUTOTUNE_REPLAY_DELAY_S", "0") or 0)
            if delay:
                time.sleep(delay)
            return got[-1]
        return got[repeat % len(got)]


class Recorded:
    """Measurements a study already holds, by config; a config not among them is measured
    by ``measure`` once and remembered. Strategies that share one ``Recorded`` (the tuner and
    the baselines, or a run resumed after a kill) never measure a config twice."""

    def __init__(self, measure: Callable[[Pick], Trial], trials: Iterable[Trial] = ()) -> None:
        self.measure = measure
        self.known: dict[str, Trial] = {t.key: t for t in trials}

    @classmethod
    def measuring(cls, source: Source, trials: Iterable[Trial] = ()) -> Recorded:
        """Measured straight from ``source`` with no study, numbered in the order measured
        (benchmarks and tests that replay a table)."""
        def measure(pick: Pick) -> Trial:
            return Trial(len(rec.known), pick.rc, source(pick.rc), pick.predicted_tokens_per_s,
                         pick.predicted_peak_mem_bytes)

        rec = cls(measure, trials)
        return rec

    def __call__(self, pick: Pick) -> Trial:
        key = config_key(pick.rc)
        if key not in self.known:
            self.known[key] = self.measure(pick)
        return self.known[key]
