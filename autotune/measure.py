"""Measure a RunConfig for real: the single place that runs a config and reports its speed.

``measure`` starts the ranks (``python -m autotune.train.worker --mode measure``, through
torchrun when there are several) as one isolated process tree under a timeout and the
workload's memory cap, so that an OOM, a crash, a hang or a dying rank becomes a
Measurement with that status and nothing is left running. The ranks discard warm-up steps,
time the rest (every raw sample kept), then replay the heaviest timed step once under a
tensor-memory tracker for the tensor-level peak (CPU allocators keep no such statistic, and
tracking costs too much to run on the timed steps).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from autotune import __version__
from autotune.config import RunConfig, save_yaml
from autotune.launch import Launch
from profilers.ceilings import matmul_ceiling
from profilers.fingerprint import current_fingerprint
from profilers.isolation import run_isolated
from profilers.records import Measurement, Status

__all__ = ["DEFAULT_TIMEOUT_S", "measure"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 900.0


def measure(rc: RunConfig, *, steps: int = 5, warmup: int = 1,
            timeout_s: float = DEFAULT_TIMEOUT_S, workdir: Path | None = None,
            launch: Launch | None = None, env: dict[str, str] | None = None) -> Measurement:
    """Run ``rc`` in an isolated process tree and return what happened.

    Args:
        rc: the config; it must be valid (RunConfig validates on construction).
        steps: timed optimizer steps.
        warmup: discarded steps before them.
        timeout_s: wall-clock limit of the whole trial, start-up included.
        workdir: where ``config.yaml``, ``metrics.json`` and ``log.txt`` go; a temporary
            folder when None.
        launch: ranks and nodes; by default the workload's devices on this node.
        env: extra environment variables for the ranks.
    """
    kind = rc.workload.hardware.device
    launch = launch or Launch.for_config(rc)
    # Stored before the trial's clock starts (a GPU's by a child process: this one opens no
    # CUDA context), so the ranks read it; CPU ranks that run fewer threads than this
    # process measure their own, once.
    matmul_ceiling(rc.precision.dtype, kind)
    with tempfile.TemporaryDirectory(prefix="autotune-measure-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        cfg, out, log_path = work / "config.yaml", work / "metrics.json", work / "log.txt"
        try:
            work.mkdir(parents=True, exist_ok=True)
            save_yaml(rc, cfg)
            out.unlink(missing_ok=True)
            log_path.open("ab").close()
        except OSError as exc:
            # A full or read-only trial folder fails this trial, not the search.
            return Measurement(status=Status.CRASHED, warmup_steps=warmup,
                               reason=f"cannot write the trial folder {work}: "
                                      f"{exc.strerror or exc}",
                               fingerprint=current_fingerprint(kind, __version__))
        argv = launch.argv("autotune.train.worker", [
            str(cfg), "--mode", "measure", "--steps", str(steps), "--warmup", str(warmup),
            "--out", str(out)])
        cap = int(rc.workload.budget.memory_cap_gb * 2**30 * launch.nproc) if kind == "cpu" else None
        run = run_isolated(argv, timeout_s=timeout_s, mem_cap_bytes=cap, log_path=log_path,
                           env={**os.environ, **(env or {})}, poll_s=0.2)
        if out.is_file():
            # Rank 0 writes the measurement once every timed step is done: a rank dying later, in
            # teardown, does not undo it; the crash is kept beside it.
            m = Measurement.model_validate_json(out.read_text())
            m.peak_rss_bytes = max(m.peak_rss_bytes or 0, run.peak_rss_bytes) or None
            if run.status is not Status.COMPLETE:
                m.extra["teardown_error"] = f"{run.status.value}: {run.reason}"
            if m.status is not Status.COMPLETE or run.status is not Status.COMPLETE:
                m.log_tail = run.log_tail
            return m
        status, reason = run.status, run.reason
        if status is Status.COMPLETE:
            status, reason = Status.CRASHED, "the trial exited without writing its result"
        if _full(work):
            reason += f"; the trial folder's file system is full ({work})"
        return Measurement(status=status, reason=reason, warmup_steps=warmup,
                           peak_rss_bytes=run.peak_rss_bytes or None, log_tail=run.log_tail,
                           fingerprint=current_fingerprint(kind, __version__))


def _full(path: Path) -> bool:
    """No room left where the trial writes: the likely cause of a trial that died silently."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024
