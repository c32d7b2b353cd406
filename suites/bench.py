"""MLPerf-style benchmark suites: time to train to a quality target, several runs per
contender, compliance-checked logs, olympic-mean scores.

A suite (``suites/defs/<name>.yaml`` or any YAML file) names a workload, the contenders, the
number of runs, the quality target (held-out evaluation loss) and the time limit of a run.
``run_suite`` tunes the workload with ``autotune run`` when ``tuned`` is a contender, then
runs every contender ``runs`` times, round-robin so that the machine's drift spreads over
all of them, each run a fresh process (``suites.target_run`` under the launcher) with its own
seed: run ``i`` of every contender shares seed ``seed + i``, so contenders are compared on
the same model initialisations and batch orders. Every run's MLPerf log goes through the
real compliance checker with the project's rules; a failing log fails the run.

Scores follow MLPerf Training: a run's time is ``run_start`` to ``run_stop``; with at least
three runs the fastest and slowest are dropped and the rest averaged (the olympic mean), a
run that did not reach the target counting as infinitely slow, so one such run is dropped
and two leave no score. (The ``mlperf-logging`` package's own scorer rejects benchmarks
outside its closed list, so the score is computed here.)

Layout of a bench directory (``autotune report`` reads it):
``suite.yaml``, ``workload.yaml``, ``fingerprint.json``, ``lengths.json``, ``tuned/`` (the
tuning run), ``runs/<contender>/<i>/{config.yaml, mlperf.log, result.json, log.txt}``,
``scores.json``, ``scores.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator

from autotune import __version__
from autotune.config import RunConfig, Workload, dump_yaml, load_yaml, save_yaml
from autotune.errors import UserError
from autotune.launch import Launch
from autotune.portfolio import Fits, device_defaults, fitting_layout, ladder_fits
from autotune.tune.verdict import ratio_interval
from profilers.fingerprint import current_fingerprint
from profilers.isolation import guarded, run_isolated
from profilers.records import Status
from profilers.store import atomic_write_text

__all__ = ["CONTENDERS", "Suite", "contender_config", "contender_fits", "load_suite",
           "olympic_mean", "run_suite", "score"]

DEFS = Path(__file__).parent / "defs"

# What each contender stands for, as the reports name it.
CONTENDERS = {
    "pad-max": "fixed-length padding to the longest sequence (Megatron-style), 8 per micro-batch",
    "pad-batch": "padding to each micro-batch's longest (Hugging Face Trainer default), 8 per micro-batch",
    "sorted": "length-sorted padded batches, 8 per micro-batch",
    "pack-bfd": "packing, best-fit decreasing up to the longest sequence (TRL packing='bfd')",
    "chunkflow": "ChunkFlow with the paper's chunking (chunks of a quarter of the longest, K=1)",
    "skrull": "Skrull's compute-balanced scheduling",
    "tuned": "the config `autotune run` tuned for this workload",
}


class TunedSpec(BaseModel):
    """How the ``tuned`` contender is obtained: ``autotune run`` on the suite's workload with
    this budget, or the knobs of a RunConfig file tuned before (``config``, relative to the
    suite file), applied to the suite's workload."""

    model_config = ConfigDict(extra="forbid")

    budget_trials: PositiveInt = 8
    steps: PositiveInt = 3
    warmup: int = Field(1, ge=0)
    config: str | None = None


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    description: str = ""
    workload: Workload | str  # inline, a preset name, or a Workload YAML relative to the suite
    contenders: list[str] = Field(min_length=1)
    runs: PositiveInt
    quality_target: dict[Literal["eval_loss"], PositiveFloat]
    time_limit_s: PositiveFloat
    eval_every_steps: PositiveInt = 5
    eval_sequences: PositiveInt = 64
    nproc: PositiveInt = 1
    seed: int = Field(0, ge=0)
    tuned: TunedSpec = Field(default_factory=TunedSpec)
    hardware: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["fp32", "bf16"] = "fp32"  # of the baseline contenders

    @field_validator("contenders")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in CONTENDERS]
        if unknown:
            raise ValueError(f"unknown contender {unknown[0]!r}; choose from {', '.join(CONTENDERS)}")
        if len(set(names)) != len(names):
            raise ValueError("a contender is named twice")
        return names

    @property
    def target(self) -> float:
        return self.quality_target["eval_loss"]


def load_suite(name_or_path: str) -> tuple[Suite, Path]:
    """A built-in suite by name or a suite YAML; its workload resolved. Returns the suite and
    the folder relative paths in it are read from."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = DEFS / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in DEFS.glob("*.yaml")))
            raise UserError(f"suite {name_or_path!r} is neither a file nor a built-in suite ({known})")
    suite = load_yaml(Suite, path)
    if isinstance(suite.workload, str):
        from autotune.cli._common import WORKLOAD_PRESETS

        if suite.workload in WORKLOAD_PRESETS:
            wl = WORKLOAD_PRESETS[suite.workload]()
        else:
            wl_path = (path.parent / suite.workload)
            if not wl_path.is_file():
                raise UserError(f"{path}: workload {suite.workload!r} is neither a preset "
                                f"({', '.join(WORKLOAD_PRESETS)}) nor a file beside the suite")
            wl = load_yaml(Workload, wl_path)
        suite = suite.model_copy(update={"workload": wl})
    if suite.workload.data.preset is None:
        raise UserError(f"{path}: the quality target is a held-out loss drawn from a synthetic "
                        "preset's source; give the workload a data.preset")
    # Every contender runs on the suite's ranks, as pure data parallelism unless tuned.
    hw = suite.workload.hardware.model_copy(update={"devices_per_node": suite.nproc, "nodes": 1,
                                                    "device": suite.hardware})
    suite = suite.model_copy(update={"workload": suite.workload.model_copy(update={"hardware": hw})})
    return suite, path.parent


def contender_config(name: str, wl: Workload, seed: int, dtype: str = "fp32", *,
                     fits: Fits | None = None) -> RunConfig:
    """The RunConfig of a baseline contender on ``wl``: data-parallel over its ranks, or,
    given ``fits`` (a memory prediction), on the first layout of the memory ladder that fits,
    as its users would run it (``autotune.portfolio.fitting_layout``)."""
    max_len = wl.data.max_len
    mbt = min(max(512, max_len), wl.budget.global_batch_tokens)
    schedule = {
        "pad-max": {"policy": "pad-max", "micro_batch_size": 8},
        "pad-batch": {"policy": "pad-batch", "micro_batch_size": 8},
        "sorted": {"policy": "sorted", "micro_batch_size": 8},
        "pack-bfd": {"policy": "pack", "micro_batch_tokens": max_len},
        "chunkflow": {"policy": "chunkflow", "chunk_size": max(64, max_len // 4),
                      "micro_batch_tokens": max(64, max_len // 4), "chunkflow_k": 1},
        "skrull": {"policy": "skrull", "micro_batch_tokens": mbt},
    }[name]
    base = device_defaults(wl) | {"schedule": schedule, "seed": seed,
                                  "precision": {"dtype": dtype}}
    return fitting_layout(wl, base, fits)


def contender_fits(wl: Workload) -> Fits | None:
    """On GPUs, contenders climb the memory ladder until the prior step model predicts they
    fit (a contender that runs out of memory would measure nothing), as ``autotune run``'s
    baselines do (``autotune.portfolio.ladder_fits``); CPU suites keep plain data
    parallelism."""
    if wl.hardware.device != "cuda":
        return None
    from autotune.cli.predict_cmd import load_models

    return ladder_fits(wl, load_models("prior", wl.hardware))


def olympic_mean(times: list[float]) -> float | None:
    """MLPerf's score: drop the fastest and the slowest, average the rest (plain mean under
    three runs); ``inf`` (a run that missed the target) that survives the drop voids it."""
    if not times:
        return None
    kept = sorted(times)[1:-1] if len(times) >= 3 else sorted(times)
    return None if any(math.isinf(t) for t in kept) else float(np.mean(kept))


def _times(runs: list[dict]) -> list[float]:
    return [r["time_to_train_s"] if r["status"] == "success" else math.inf for r in runs]


def _olympic_or_inf(times: np.ndarray) -> float:
    got = olympic_mean(list(times))
    return math.inf if got is None else got


def score(suite: Suite, results: dict[str, list[dict]]) -> dict:
    """Per contender: runs, successes, olympic mean time to train and the spread, median
    throughput and MFU, and the tuned contender's speedup over it."""
    out: dict[str, dict] = {}
    for name, runs in results.items():
        times = _times(runs)
        ok = [t for t in times if not math.isinf(t)]
        def med(key: str, runs: list[dict] = runs) -> float | None:
            v = [r[key] for r in runs if r.get(key) is not None]
            return float(np.median(v)) if v else None

        out[name] = {"runs": len(runs), "successes": len(ok), "olympic_mean_s": olympic_mean(times),
                     "min_s": min(ok) if ok else None, "max_s": max(ok) if ok else None,
                     "tokens_per_s_median": med("tokens_per_s"), "mfu_median": med("mfu"),
                     "energy_j_median": med("energy_j"),
                     "aborted": sum(r["status"] == "aborted" for r in runs),
                     "failed": sum(r["status"] == "failed" for r in runs)}
    tuned = out.get("tuned", {}).get("olympic_mean_s")
    for name, s in out.items():
        s["speedup_of_tuned"] = (s["olympic_mean_s"] / tuned
                                 if tuned and s["olympic_mean_s"] else None)
        # Runs on a shared machine scatter: the speedup's 95% bootstrap interval, of the
        # same olympic means over every run (one that missed the target infinitely slow).
        iv = ratio_interval(_times(results[name]), _times(results["tuned"]),
                            statistic=_olympic_or_inf) if tuned and s["speedup_of_tuned"] else None
        # JSON has no infinity: an unbounded upper end is kept as None beside its low end.
        s["speedup_low"], s["speedup_high"] = (
            (iv[0], iv[1] if math.isfinite(iv[1]) else None) if iv else (None, None))
    return {"suite": suite.name, "quality_target": suite.quality_target, "runs": suite.runs,
            "tuned": "tuned" if "tuned" in out else None, "contenders": out}


# MLPerf result-summarizer columns first (the per-benchmark score column is the suite), then
# the project's own.
_SUMMARY_COLUMNS = ["Public ID", "Organization", "Availability", "System", "# of Nodes",
                    "Processor", "Accelerator", "# of Accelerators", "Software"]
_PROJECT_COLUMNS = ["contender", "runs", "successes", "aborted", "failed", "olympic_mean_s",
                    "min_s", "max_s", "speedup_of_tuned", "speedup_low", "speedup_high",
                    "tokens_per_s_median", "mfu_median",
                    "energy_j_median"]


def scores_csv(suite: Suite, scores: dict, fingerprint: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(_SUMMARY_COLUMNS + [suite.name] + _PROJECT_COLUMNS)
    hw = suite.workload.hardware
    system = (f"{fingerprint.get('cpu_model') or hw.device}, {fingerprint.get('threads')} threads"
              if hw.device == "cpu" else f"{hw.devices_per_node} x {fingerprint.get('device_name')}")
    for name, s in scores["contenders"].items():
        fixed = ["", "autotune", "research", system, hw.nodes,
                 fingerprint.get("cpu_model", ""),
                 fingerprint.get("device_name") if hw.device == "cuda" else "",
                 hw.devices_per_node * hw.nodes if hw.device == "cuda" else 0,
                 f"autotune {__version__}, torch {fingerprint.get('torch_version', '')}"]
        minutes = "" if s["olympic_mean_s"] is None else f"{s['olympic_mean_s'] / 60:.4f}"
        w.writerow(fixed + [minutes, name] + [("" if s[k] is None else s[k])
                                              for k in _PROJECT_COLUMNS[1:]])
    return buf.getvalue()


def _tune(suite: Suite, base: Path, out: Path) -> RunConfig:
    """The tuned contender's config: from a file, or from ``autotune run`` on the workload."""
    if suite.tuned.config:
        path = base / suite.tuned.config
        if not path.is_file():
            raise UserError(f"tuned.config {suite.tuned.config!r}: no such file beside the suite")
        rc = load_yaml(RunConfig, path)
        return rc.model_copy(update={"workload": suite.workload})
    run_dir = out / "tuned"
    if not (run_dir / "tuned.yaml").is_file():
        argv = [sys.executable, "-m", "autotune", "run", "--workload", str(out / "workload.yaml"),
                "--nproc", str(suite.nproc), "--budget-trials", str(suite.tuned.budget_trials),
                "--steps", str(suite.tuned.steps), "--warmup", str(suite.tuned.warmup),
                "--seed", str(suite.seed), "--out", str(run_dir)]
        if (run_dir / "summary.json").exists() or (run_dir / "trials").exists():
            argv = [sys.executable, "-m", "autotune", "run", "--resume", str(run_dir)]
        print(f"tuning the workload: {' '.join(argv[2:])}", file=sys.stderr)
        done = subprocess.run(guarded(argv), check=False)
        if done.returncode != 0 or not (run_dir / "tuned.yaml").is_file():
            raise RuntimeError(f"autotune run failed (exit {done.returncode}); see {run_dir}")
    return load_yaml(RunConfig, run_dir / "tuned.yaml")


def _one_run(suite: Suite, rc: RunConfig, run_dir: Path, name: str, index: int) -> dict:
    """One fresh process tree training ``rc`` to the target; its result, compliance checked."""
    from suites.mlperf import check_log

    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(rc, run_dir / "config.yaml")
    (run_dir / "result.json").unlink(missing_ok=True)
    launch = Launch.for_config(rc, nproc=suite.nproc)
    argv = launch.argv("suites.target_run", [
        str(run_dir / "config.yaml"), "--target", repr(suite.target),
        "--time-limit", repr(suite.time_limit_s), "--benchmark", f"autotune-{suite.name}",
        "--out", str(run_dir), "--eval-every", str(suite.eval_every_steps),
        "--eval-sequences", str(suite.eval_sequences)])
    # Start-up and the last evaluation come on top of the limit; past this the run hangs.
    timeout = suite.time_limit_s * 1.5 + 120
    started = time.perf_counter()
    proc = run_isolated(argv, timeout_s=timeout, mem_cap_bytes=None, log_path=run_dir / "log.txt",
                        env={**os.environ, "PYTHONUNBUFFERED": "1"}, poll_s=0.2)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        # Rank 0 writes the result after run_stop: a rank dying later, in teardown, does not
        # undo a run that reached its end; it is recorded beside the result.
        result = json.loads(result_path.read_text())
        if proc.status is not Status.COMPLETE:
            result["teardown_error"] = f"{proc.status.value}: {proc.reason}"
    else:
        reason = proc.reason or "the run exited without writing its result"
        result = {"status": "failed", "reason": f"{proc.status.value}: {reason}",
                  "time_to_train_s": None, "wall_s": time.perf_counter() - started,
                  "train_samples": 0, "tokens": 0, "tokens_per_s": None, "mfu": None,
                  "energy_j": None, "steps": 0, "eval": [], "train": [], "seed": rc.seed,
                  "log_tail": proc.log_tail}
    log = run_dir / "mlperf.log"
    ok, output = check_log(log) if log.is_file() else (False, "no mlperf.log written")
    result |= {"contender": name, "run": index, "compliance": {"ok": ok, "output": output[-4000:]}}
    if not ok and result["status"] != "failed":
        result["status"], result["reason"] = "failed", "the MLPerf log failed the compliance check"
    atomic_write_text(result_path, json.dumps(result, indent=1))
    return result


def run_suite(suite: Suite, base: Path, out: Path, *, progress: bool = True) -> dict:
    """Run every contender ``suite.runs`` times into ``out`` (resumable: a run with a
    result is not run again) and write the scores."""
    from profilers.progress import progress as progress_bar

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "suite.yaml", dump_yaml(suite))
    save_yaml(suite.workload, out / "workload.yaml")
    fp = current_fingerprint(suite.hardware, __version__)
    fingerprint = json.loads(fp.model_dump_json())
    atomic_write_text(out / "fingerprint.json", json.dumps(fingerprint, indent=1))
    from autotune.data import load_dataset

    data = load_dataset(suite.workload.data, suite.workload.model.resolve())
    atomic_write_text(out / "lengths.json", json.dumps({"lengths": data.lengths.tolist()}))
    tuned = _tune(suite, base, out) if "tuned" in suite.contenders else None
    fits = contender_fits(suite.workload)  # one predictor for every contender's layout
    results: dict[str, list[dict]] = {c: [] for c in suite.contenders}
    bar = progress_bar(total=suite.runs * len(suite.contenders), unit="run",
                       desc=f"bench {suite.name}", enabled=progress)
    for i in range(1, suite.runs + 1):
        seed = suite.seed + i
        for name in suite.contenders:
            run_dir = out / "runs" / name / str(i)
            done = run_dir / "result.json"
            prior = json.loads(done.read_text()) if done.is_file() else None
            if prior is not None and "compliance" in prior:
                result = prior
            else:
                rc = (tuned.model_copy(update={"seed": seed}) if name == "tuned"
                      else contender_config(name, suite.workload, seed, suite.dtype, fits=fits))
                result = _one_run(suite, rc, run_dir, name, i)
            results[name].append(result)
            bar.update()
            t = result.get("time_to_train_s")
            bar.set_postfix_str(f"{name} #{i}: {result['status']}"
                                + (f" {t:.0f} s" if t is not None else ""))
    bar.close()
    scores = score(suite, results)
    atomic_write_text(out / "scores.json", json.dumps(scores, indent=1))
    atomic_write_text(out / "scores.csv", scores_csv(suite, scores, fingerprint))
    return scores
