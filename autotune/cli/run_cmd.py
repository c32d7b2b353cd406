"""``autotune run``: tune a workload. The step model prices every valid candidate, the best
predicted are measured for real a few at a time (each round's measurements recalibrate the
model), and the best *measured* config is handed back with a report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from autotune.cli._common import (
    WORKLOAD_PRESETS,
    load_workload,
    non_negative_int,
    positive_float,
    positive_int,
)
from autotune.config import RunConfig, Workload
from autotune.errors import UserError
from profilers.progress import progress

DEFAULT_BUDGET_S = 480.0  # `autotune run` with no arguments ends within 10 minutes
MAX_PRICED = 50_000  # larger spaces are sampled by TPE on the predictions, not priced whole
PLAN_FILES = frozenset({"plan.md", "tuned.yaml"})  # what --plan-only writes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="tune a workload and write a run directory")
    p.add_argument("--workload", default="tiny",
                   help=f"a Workload YAML, a RunConfig YAML (its knobs become your baseline in "
                        f"the report) or a preset ({', '.join(WORKLOAD_PRESETS)}); default tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override the workload's device")
    p.add_argument("--gpus", type=positive_int, help="CUDA devices per node (implies --device cuda)")
    p.add_argument("--nproc", type=positive_int, help="processes (ranks) per node")
    p.add_argument("--budget-trials", type=positive_int,
                   help="real measurements at most (default the workload's budget.trials)")
    p.add_argument("--budget-s", type=positive_float,
                   help=f"seconds of measuring at most (default: what the trial budget needs "
                        f"at the best candidates' predicted step time, at least "
                        f"{DEFAULT_BUDGET_S:.0f}; the search stops at whichever budget ends "
                        f"first)")
    p.add_argument("--batch", type=positive_int, default=3,
                   help="candidates measured per round between recalibrations (default 3)")
    p.add_argument("--models", help="fitted models (default models/ when present, else the "
                                    "analytic prior on this machine's measured ceilings; "
                                    "'prior' for the prior even then)")
    p.add_argument("--space", metavar="FILE",
                   help="a SearchSpace YAML: the choices per knob (default the built-in space)")
    p.add_argument("--baselines", action="store_true",
                   help="also run, at the tuner's measurement budget: DeepSpeed-autotuner-style "
                        "ZeRO x micro-batch search, Optuna TPE on measurements only, random "
                        "search (configs one of them measured are not measured again)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the TPE and random baselines and of the predicted studies")
    p.add_argument("--pareto", action="store_true",
                   help="tune for the throughput/memory Pareto front: NSGA-II on the "
                        "predictions proposes the front, measurements spread along it")
    p.add_argument("--predicted-trials", type=positive_int, default=3000,
                   help="predicted trials of the NSGA-II study (--pareto) or of the TPE study "
                        f"that samples a space of more than {MAX_PRICED:,} configs")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps per trial")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="warm-up steps per trial")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per trial")
    p.add_argument("--out", help="run directory (default results/runs/<run-id>)")
    p.add_argument("--resume", metavar="RUNDIR", help="continue the run in RUNDIR")
    p.add_argument("--storage", help="Optuna storage URL of the measured trials "
                                     "(default sqlite:///RUNDIR/study.db)")
    p.add_argument("--no-memory-trace", dest="memory_trace", action="store_false",
                   help="on GPUs, measure candidates without first tracing their peak memory "
                        "at real size (autotune memory); by default one traced over the cap "
                        "is recorded as out of memory without running it")
    p.add_argument("--replay", action="append", metavar="TABLE",
                   help="answer measurements from a recorded table instead of running them")
    p.add_argument("--plan-only", action="store_true",
                   help="predict only: rank the space without measuring (every figure predicted)")
    p.add_argument("--confirm", type=non_negative_int, default=5, metavar="ROUNDS",
                   help="after the search, measure the finalists (the best configs, the "
                        "baseline and each --baselines strategy's best) again, interleaved, "
                        "for at least 3 and at most ROUNDS rounds, until the best one's "
                        "bootstrap interval separates; the tuned figure is their median "
                        "(default 5; 0 reports the search's single shots)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _workload(args: argparse.Namespace) -> tuple[Workload, RunConfig | None]:
    """The workload to tune, and the user's own config when a RunConfig was given."""
    from autotune.config import load_yaml

    user_rc = None
    path = Path(args.workload)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        import yaml

        try:
            keys = set(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError:
            keys = set()
        if keys & {"schedule", "parallel", "checkpointing", "precision", "kernels"}:
            user_rc = load_yaml(RunConfig, path)
            wl = user_rc.workload
        else:
            wl = load_workload(args.workload)
    else:
        wl = load_workload(args.workload)
    hw = wl.hardware.model_dump()
    if args.gpus:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < args.gpus and not args.plan_only:
            raise UserError(f"--gpus {args.gpus}: this machine has {have} CUDA device(s); add "
                            f"--plan-only to plan for them from the models alone (every figure "
                            f"predicted), or tune on CPU ranks with --device cpu --nproc N")
        hw.update(device="cuda", devices_per_node=args.gpus)
    if args.device:
        hw["device"] = args.device
    if args.nproc:
        hw["devices_per_node"] = args.nproc
    wl = wl.model_copy(update={"hardware": type(wl.hardware).model_validate(hw)})
    if user_rc is not None:
        user_rc = user_rc.model_copy(update={"workload": wl})
    return wl, user_rc


def _run_dir(args: argparse.Namespace, wl: Workload):  # noqa: ANN202
    from autotune.rundir import RunDir, validate_name

    if args.resume:
        path = Path(args.resume)
        if not (path / "workload.yaml").is_file() or not (path / "run.json").is_file():
            raise UserError(f"--resume {path}: not a run directory (no workload.yaml and "
                            f"run.json); start one with `autotune run --out {path}`")
        return RunDir(path), True
    if args.out:
        out = Path(args.out)
        validate_name(out.name)
        if (out / "run.json").is_file():
            return RunDir(out), True  # the same command again continues the run
        # a folder holding only an earlier --plan-only's files is planned into again
        if out.exists() and {f.name for f in out.iterdir()} - PLAN_FILES:
            raise UserError(f"--out {out} exists, is not empty and is not a run directory")
        out.mkdir(parents=True, exist_ok=True)
        return RunDir(out), False
    return RunDir.create(Path("results/runs"), f"{wl.model.label()}-{wl.data.label()}"), False


def run(args: argparse.Namespace) -> int:
    from autotune.cli.predict_cmd import load_models
    from autotune.config import dump_yaml, load_yaml
    from autotune.data import load_lengths
    from autotune.launch import Launch
    from autotune.measure import measure
    from autotune.portfolio import baseline_configs, ladder_fits
    from autotune.predict import StepPredictor
    from autotune.report import render_report
    from autotune.rundir import validate_name
    from autotune.search import (
        ReplaySource,
        Trial,
        TrialLog,
        config_key,
        guided_search,
        memory_limit,
    )

    wl, user_rc = _workload(args)
    if args.out:
        validate_name(Path(args.out).name)
    if not args.replay and not args.plan_only:
        Launch.for_config(baseline_configs(wl)[0])  # refuse what this machine cannot host
    if args.resume:
        _run_dir(args, wl)  # refuses what is not a run before any work
        wl = load_yaml(Workload, Path(args.resume) / "workload.yaml")
    dataset = load_lengths(wl.data, wl.model.resolve())  # planning and the report need no tokens
    # an unreachable URL: before any file, the cache's measured ceilings included
    log = TrialLog(args.storage) if args.storage else None
    space = _space(args, wl, dataset.max_len)
    models = load_models(args.models, wl.hardware)
    candidates = _candidates(args, space, wl, models)
    if not candidates:
        raise UserError(f"no valid config of the search space fits {wl.world_size} device(s) "
                        f"of this workload")
    predicted = StepPredictor(models, warmup=args.warmup, steps=args.steps).predict_many(candidates)
    if predicted.peak_mem_bytes.min() > memory_limit(wl):
        _refuse_unfit(wl, predicted)
    source = ReplaySource(args.replay) if args.replay else None
    rundir, resumed = _run_dir(args, wl)
    if args.plan_only:
        return _plan_only(args, rundir, candidates, predicted, models, space, dataset.max_len)
    storage = args.storage or f"sqlite:///{(rundir.path / 'study.db').resolve()}"
    if not resumed:
        # The run folder is whole before its study exists: a run killed in between is a run
        # directory the same command continues, never a folder it refuses.
        rundir.write_workload(wl)
        rundir.write_text("space.yaml", dump_yaml(space))
        _keep_models(models, rundir.path)
        rundir.write_text("run.json", json.dumps({"storage": storage, "models": args.models,
                                                  "replay": args.replay}, indent=2) + "\n")
    log = log or TrialLog(storage)
    done = log.trials()
    budget = args.budget_trials or wl.budget.trials
    deadline = time.monotonic() + (args.budget_s or default_budget_s(
        wl, predicted, budget, warmup=args.warmup, steps=args.steps))
    bar = progress(total=budget, initial=len(done), unit="trial", desc="measuring")

    # Configs a baseline measured before a kill are not measured again by the tuner.
    base_log = TrialLog(storage, study_name="baselines") if args.baselines else None
    base_done = {config_key(t.rc): t for t in base_log.trials()} if base_log else {}

    def measure_one(rc: RunConfig, n: int, workdir: Path | None = None):  # noqa: ANN202
        bar.set_postfix_str(rc.label())
        if config_key(rc) in base_done:
            return base_done[config_key(rc)].measurement
        if source is not None:
            return source(rc, n)
        if args.memory_trace and rc.workload.hardware.device == "cuda":
            from autotune.memtrace import confirm_fits

            bar.set_postfix_str(f"{rc.label()}: tracing its memory")
            refused = confirm_fits(rc)
            if refused is not None:
                return refused
            bar.set_postfix_str(rc.label())
        return measure(rc, steps=args.steps, warmup=args.warmup, timeout_s=args.timeout,
                       workdir=workdir or rundir.trial_path(n),
                       env={"AUTOTUNE_TRIAL": str(n)})

    def record(trial: Trial) -> None:
        log.add(trial)  # committed before the next trial starts: a kill loses nothing done
        _copy_to_folder(rundir, trial, bar)
        bar.update()

    # The baseline users run without tuning (their own config when they gave one) is
    # always measured, first, so the report can say what tuning bought.
    baseline = space.canonical(user_rc or baseline_configs(wl, fits=ladder_fits(wl, models))[0])
    if not any(t.rc.model_dump_json() == baseline.model_dump_json() for t in done):
        trial = Trial(len(done), baseline, measure_one(baseline, len(done)))
        record(trial)
        done.append(trial)
    if args.pareto:
        trials = _along_front(candidates, measure_one, budget, done, record, deadline,
                              models, args)
    else:
        trials = guided_search(candidates, models, measure_one, budget=budget, batch=args.batch,
                               done=done, on_trial=record, warmup=args.warmup, steps=args.steps,
                               deadline=deadline)
    bar.close()
    ok = [t for t in trials if t.ok]
    best = max(ok, key=lambda t: t.measurement.tokens_per_s) if ok else None
    compared = {}
    if base_log is not None:
        compared = _run_baselines(args, candidates, baseline, trials, base_log, base_done,
                                  measure_one, rundir)
    found, finalists = _confirm(args, ok, baseline, compared, source, rundir) if (
        args.confirm and ok) else ({}, {})
    tuned = _tuned_of(found)
    if best is not None:
        rundir.write_tuned(finalists[tuned] if tuned else best.rc)
    tuples = [(t.n, t.rc, t.measurement) for t in trials]
    report = render_report(workload_rc=baseline, dataset=dataset, trials=tuples,
                           best=(best.n, best.rc, best.measurement) if best else None)
    if best is not None:
        report += "\n" + _top5(ok, best) + "\n" + _cost_breakdown(models, args, best, trials[0])
    if compared:
        report += "\n" + _baselines_section(best, trials, compared)
    if args.pareto:
        report += "\n" + _front_section(ok)
    if tuned:
        from autotune.verdict import section

        report += "\n" + section(found, finalists, tuned)
    report += "\n" + _predicted_vs_measured(trials, models.calibration)
    rundir.write_text("report.md", report)
    summary = {"run_dir": str(rundir.path), "tuned": str(rundir.path / "tuned.yaml") if best else None,
               "config": (finalists[tuned] if tuned else best.rc).label() if best else None,
               "tokens_per_s": (found[tuned].median if tuned else
                                best.measurement.tokens_per_s if best else None),
               "search_tokens_per_s": best.measurement.tokens_per_s if best else None,
               "measured_trials": len(trials), "candidates": len(candidates),
               **({"baselines": {name: _best_of(ts) for name, ts in compared.items()}}
                  if compared else {}),
               **({"confirmed": {n: {"config": finalists[n].label(), **v.to_json_dict()}
                                 for n, v in found.items()}} if found else {})}
    rundir.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    elif tuned:
        v = found[tuned]
        print(f"tuned: {finalists[tuned].label()} at {v.median:,.0f} tokens/s (median of "
              f"{len(v.samples)} measurements after the search, 95% interval {v.low:,.0f}-"
              f"{v.high:,.0f}; {len(trials)} of {len(candidates)} candidates measured); "
              f"report: {rundir.path / 'report.md'}")
    elif best is not None:
        print(f"tuned: {best.rc.label()} at {best.measurement.tokens_per_s:,.0f} tokens/s "
              f"(measured; {len(trials)} of {len(candidates)} candidates measured); report: "
              f"{rundir.path / 'report.md'}")
    else:
        print(f"no candidate completed; see {rundir.path / 'report.md'}", file=sys.stderr)
    return 0 if best is not None else 1


def _candidates(args: argparse.Namespace, space, wl: Workload, models) -> list[RunConfig]:  # noqa: ANN001
    """Every valid config of the space, or, past MAX_PRICED, the best of a TPE study on the
    predictions; with --pareto, NSGA-II's predicted front first."""
    from autotune.predict import StepPredictor
    from autotune.propose import SpaceEncoding, propose, space_size

    size = space_size(space, wl)
    if size <= MAX_PRICED and not args.pareto:
        return list(space.grid(wl))
    enc = (SpaceEncoding(space=space, workload=wl) if size > MAX_PRICED
           else SpaceEncoding(list(space.grid(wl))))
    predictor = StepPredictor(models, warmup=args.warmup, steps=args.steps)
    got = propose(enc, predictor, trials=args.predicted_trials, keep=500, pareto=args.pareto,
                  cap_bytes=wl.budget.memory_cap_gb * 2**30, seed=args.seed)
    how = "NSGA-II (throughput/memory front)" if args.pareto else "TPE"
    print(f"space of up to {size:,} configs: {args.predicted_trials:,} predicted trials of "
          f"{how} proposed {len(got)} candidates", file=sys.stderr)
    return got


def _along_front(candidates, measure_one, budget, done, record, deadline, models, args):  # noqa: ANN001, ANN202
    """--pareto: the predicted front measured at evenly spaced points along it (the
    candidates come front first, highest predicted tokens/s first)."""
    from autotune.predict import StepPredictor
    from autotune.propose import pareto_front
    from autotune.search import Trial, config_key

    pred = StepPredictor(models, warmup=args.warmup, steps=args.steps).predict_many(candidates)
    front = pareto_front(list(zip(pred.tokens_per_s, pred.peak_mem_bytes, strict=True)))
    trials, tried = list(done), {config_key(t.rc) for t in done}
    room = max(budget - len(trials), 0)
    picks = [front[int(round(i))] for i in np.linspace(0, len(front) - 1, min(room, len(front)))]
    picks += [i for i in range(len(candidates)) if i not in set(picks)]  # then the rest
    for i in picks:
        if len(trials) >= budget or time.monotonic() >= deadline:
            break
        rc = candidates[i]
        if config_key(rc) in tried:
            continue
        trial = Trial(len(trials), rc, measure_one(rc, len(trials)),
                      float(pred.tokens_per_s[i]), float(pred.peak_mem_bytes[i]))
        trials.append(trial)
        tried.add(config_key(rc))
        record(trial)
    return trials


def _copy_to_folder(rundir, trial, bar) -> None:  # noqa: ANN001
    """The trial's folder copy of what the study already holds: a folder that cannot be
    written is said, and the search goes on."""
    try:
        rundir.write_trial(trial.n, trial.rc, trial.measurement)
    except OSError as exc:
        bar.write(f"autotune: warning: trial {trial.n}'s folder not written "
                  f"({exc.strerror or exc}); its measurement is in the study", file=sys.stderr)


def _front_section(ok: list) -> str:
    from autotune.propose import pareto_front

    pts = [(t.measurement.tokens_per_s, t.measurement.peak_mem_bytes or np.inf) for t in ok]
    lines = ["## Throughput / memory Pareto front (measured)", "",
             "Measured configs no other measured config beats on both tokens/s and peak tensor "
             "memory: pick by how much memory you can spare.", "",
             "| config | tokens/s | peak tensor MiB |", "|---|---:|---:|"]
    for i in pareto_front(pts):
        t = ok[i]
        lines.append(f"| `{t.rc.label()}` | {t.measurement.tokens_per_s:,.0f} | "
                     f"{(t.measurement.peak_mem_bytes or 0) / 2**20:,.0f} |")
    return "\n".join(lines) + "\n"


def _keep_models(models, path: Path) -> None:  # noqa: ANN001
    """The models the run priced with, and which profiles they were fitted on, kept with it:
    a report can be re-derived after models/ and profiles/ have moved on."""
    from profilers.store import atomic_write_text

    models.save(path / "models")
    store = Path("profiles") / "store.json"
    if models.families and store.is_file():
        atomic_write_text(path / "models" / "profiles_store.json", store.read_text())


def _top5(ok: list, best) -> str:  # noqa: ANN001
    top = sorted(ok, key=lambda t: -t.measurement.tokens_per_s)[:5]
    lines = ["## Top 5 measured", "",
             "| rank | config | measured tokens/s | of the tuned | predicted before measuring |",
             "|---:|---|---:|---:|---:|"]
    for r, t in enumerate(top, 1):
        pred = f"{t.predicted_tokens_per_s:,.0f}" if t.predicted_tokens_per_s else "-"
        lines.append(f"| {r} | `{t.rc.label()}` | {t.measurement.tokens_per_s:,.0f} | "
                     f"{t.measurement.tokens_per_s / best.measurement.tokens_per_s:.0%} | {pred} |")
    return "\n".join(lines) + "\n"


# Seconds a trial costs besides its steps: start-up (processes, imports, the model's build;
# on GPUs also NCCL, the allocator's warm-up and, for compiled blocks, their compile).
TRIAL_START_S = {"cpu": 10.0, "cuda": 120.0}


def default_budget_s(wl: Workload, predicted, trials: int, *, warmup: int, steps: int  # noqa: ANN001
                     ) -> float:
    """Seconds of measuring that ``trials`` of the best predicted candidates need (their
    median predicted step, the warm-up, timed and replayed steps, start-up), and never less
    than DEFAULT_BUDGET_S: an 8B model's trial takes minutes where a CPU's takes seconds."""
    from autotune.search import memory_limit

    fits = predicted[predicted.peak_mem_bytes <= memory_limit(wl)]
    best = fits.sort_values("tokens_per_s", ascending=False).head(10)
    step_s = float(best.step_time_s.median()) if len(best) else 0.0
    per_trial = TRIAL_START_S[wl.hardware.device] + (warmup + steps + 1) * step_s
    return max(DEFAULT_BUDGET_S, trials * per_trial)


def _space(args: argparse.Namespace, wl: Workload, longest: int):  # noqa: ANN202
    """The user's SearchSpace, the resumed run's, or the built-in one for the workload's
    devices (``SearchSpace.default_for``)."""
    from autotune.config import SearchSpace, load_yaml

    if args.space:
        return load_yaml(SearchSpace, args.space)
    if args.resume and (Path(args.resume) / "space.yaml").is_file():
        return load_yaml(SearchSpace, Path(args.resume) / "space.yaml")
    if args.out and (Path(args.out) / "space.yaml").is_file():
        return load_yaml(SearchSpace, Path(args.out) / "space.yaml")
    return SearchSpace.default_for(wl, longest=longest)


def _run_baselines(args, candidates, user, trials, log, done, measure_one, rundir):  # noqa: ANN001, ANN202
    """Each baseline at the tuner's measurement budget, sharing every measurement taken."""
    from autotune.baselines import BASELINES, Measurer, run_baseline
    from autotune.search import config_key

    cache = {config_key(t.rc): t for t in trials} | done
    first_n = max([t.n for t in cache.values()], default=-1) + 1
    bar = progress(total=len(BASELINES) * len(trials), unit="trial", desc="baselines")

    def fresh(rc: RunConfig, _n: int):  # noqa: ANN202
        n = first_n + len(log.trials())
        return measure_one(rc, n, rundir.path / "trials" / f"b{n:03d}")

    def record(trial) -> None:  # noqa: ANN001
        trial.n = first_n + len(log.trials())
        log.add(trial)
        _copy_to_folder(rundir, trial, bar)

    out = {}
    for name in BASELINES:
        m = Measurer(fresh, budget=len(trials), cache=cache, on_new=record)
        out[name] = run_baseline(name, candidates, m, user=user, seed=args.seed)
        bar.update(len(trials))
    bar.close()
    return out


def _confirm(args, ok, baseline, compared, source, rundir):  # noqa: ANN001, ANN202
    """The finalists measured again, interleaved (``autotune.verdict``)."""
    import re

    from autotune.measure import Status, measure
    from autotune.verdict import confirm, finalists

    ranked = sorted(ok, key=lambda t: -t.measurement.tokens_per_s)
    configs = finalists(ranked, baseline, compared)
    bar = progress(total=args.confirm * len(configs), unit="run", desc="confirming")

    def again(name: str, rc: RunConfig, r: int) -> float | None:
        bar.set_postfix_str(f"round {r + 1}: {name}")
        m = source.again(rc, r) if source is not None else measure(
            rc, steps=args.steps, warmup=args.warmup, timeout_s=args.timeout,
            workdir=rundir.path / "confirm" / f"r{r + 1}-{re.sub(r'[^A-Za-z0-9]+', '-', name)}",
            env={"AUTOTUNE_TRIAL": f"confirm-{r + 1}"})
        bar.update()
        return m.tokens_per_s if m.status is Status.COMPLETE else None

    found = confirm(configs, again, min_rounds=min(3, args.confirm), max_rounds=args.confirm)
    bar.close()
    return found, configs


def _tuned_of(found: dict) -> str | None:
    """The confirmed tuned config: the best median among the search's finalists."""
    return next((n for n, v in found.items() if n in ("tuned", "runner-up") and v.samples), None)


def _best_of(trials: list) -> dict:
    ok = [t for t in trials if t.ok and t.measurement.tokens_per_s]
    best = max(ok, key=lambda t: t.measurement.tokens_per_s) if ok else None
    return {"measurements": len(trials), "config": best.rc.label() if best else None,
            "tokens_per_s": best.measurement.tokens_per_s if best else None}


def _baselines_section(best, trials: list, compared: dict) -> str:  # noqa: ANN001
    from autotune.baselines import BASELINES

    tuned = best.measurement.tokens_per_s if best else None
    lines = ["## Against the baselines, at the same measurement budget", "",
             f"Each strategy could measure {len(trials)} configs (the tuner's own count, its "
             f"pad-batch baseline included); a config one strategy measured was not measured "
             f"again for another. Measured tokens/s as measured.", "",
             "| strategy | measured | best config | best tokens/s | tuned / strategy |",
             "|---|---:|---|---:|---:|",
             f"| **autotune** (cost-model guided) | {len(trials)} | "
             f"`{best.rc.label() if best else '-'}` | {tuned or 0:,.0f} | 1.00 |"]
    first = trials[0]
    if first.ok:
        lines.append(f"| pad-batch default (data parallel) | 1 | `{first.rc.label()}` | "
                     f"{first.measurement.tokens_per_s:,.0f} | "
                     f"{tuned / first.measurement.tokens_per_s:.2f}x |")
    for name, ts in compared.items():
        b = _best_of(ts)
        ratio = f"{tuned / b['tokens_per_s']:.2f}x" if tuned and b["tokens_per_s"] else "-"
        lines.append(f"| {name}: {BASELINES[name]} | {b['measurements']} | "
                     f"`{b['config'] or '-'}` | {b['tokens_per_s'] or 0:,.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def _cost_breakdown(models, args, best, base) -> str:  # noqa: ANN001
    """Where the winner's step time goes against the pad-batch baseline's, as the step model
    prices them: the "why" in seconds."""
    from autotune.predict import StepPredictor

    predictor = StepPredictor(models, warmup=args.warmup, steps=args.steps)
    rows = [(best.rc, predictor.predict(best.rc))]
    if base.rc.model_dump_json() != best.rc.model_dump_json():
        rows.append((base.rc, predictor.predict(base.rc)))
    parts = [k for k in rows[0][1].breakdown if any(abs(p.breakdown.get(k, 0)) > 1e-6 for _, p in rows)]
    head = " | ".join(f"`{rc.label()}`" for rc, _ in rows)
    lines = ["## Cost breakdown of the tuned config", "",
             f"Seconds per optimizer step as the step model prices them ({models.calibration} "
             f"models; predicted, not measured), beside the pad-batch baseline: the parts that "
             f"shrink are why the tuned config wins.", "",
             f"| part | {head} |", "|---|" + "---:|" * len(rows)]
    for k in parts:
        lines.append(f"| {k} | " + " | ".join(f"{p.breakdown.get(k, 0):.3f}" for _, p in rows) + " |")
    lines.append("| **step (predicted)** | " + " | ".join(f"{p.step_time_s:.3f}" for _, p in rows) + " |")
    lines.append("| step (measured) | " + " | ".join(
        f"{t.measurement.step_time_s:.3f}" if t.ok and t.measurement.step_time_s else "-"
        for t in ([best, base] if len(rows) == 2 else [best])) + " |")
    return "\n".join(lines) + "\n"


def _predicted_vs_measured(trials: list, calibration: str) -> str:
    from autotune.calibrate import canary_drift

    lines = ["## Predicted against measured", "",
             f"Predictions made before each candidate was measured ({calibration} models, "
             f"recalibrated on the measurements of earlier rounds). Both at the machine's "
             f"reference speed: a measurement is scaled by the canary matmul timed around it, "
             f"as the models were fitted.", "",
             "| # | config | predicted tokens/s | measured tokens/s | measured / predicted |",
             "|---|---|---:|---:|---:|"]
    for t in trials:
        drift = canary_drift(t.measurement.extra)
        pred = t.predicted_tokens_per_s
        meas = t.measurement.tokens_per_s * drift if t.measurement.tokens_per_s else None
        ratio = f"{meas / pred:.2f}" if pred and meas else "-"
        lines.append(f"| {t.n} | `{t.rc.label()}` | {pred:,.0f} | " if pred else
                     f"| {t.n} | `{t.rc.label()}` | - | ")
        lines[-1] += f"{meas:,.0f} | {ratio} |" if meas else f"{t.measurement.status.value} | - |"
    return "\n".join(lines) + "\n"


def _plan_only(args: argparse.Namespace, rundir, candidates: list, predicted, models,  # noqa: ANN001
               space, longest: int) -> int:  # noqa: ANN001
    """Rank the space from the models alone and write plan.md: the best predicted configs
    that fit, and how the best one scales with the node count. Nothing is measured."""
    from autotune.predict import StepPredictor
    from autotune.search import MEMORY_MARGIN, memory_limit

    wl = candidates[0].workload
    predictor = StepPredictor(models, warmup=args.warmup, steps=args.steps)
    feasible = predicted.peak_mem_bytes <= memory_limit(wl)
    order = list(predicted[feasible].sort_values("tokens_per_s", ascending=False).index)
    top = [_plan_row(candidates[i], predicted.loc[i], predictor) for i in order[:10]]
    lines = ["# autotune plan (predicted, nothing measured)", "",
             f"{len(candidates)} candidates priced by the step model ({models.calibration}; "
             f"ceilings: {models.ceilings.source}), {int(feasible.sum())} predicted to fit "
             f"{wl.budget.memory_cap_gb:g} GB per device with a {MEMORY_MARGIN:.0%} margin. "
             f"Every figure below is a prediction.", "", *_plan_table(top)]
    held, counts = _longest_fits(candidates, predicted, feasible, longest)
    lines += ["", *held]
    scaling = _scaling(args, space, wl, candidates, predicted, order, predictor)
    if scaling:
        lines += ["", f"## Scaling: the best predicted config per node count "
                      f"({wl.hardware.devices_per_node} devices per node)", "",
                  *_plan_table(scaling, nodes=True)]
    rundir.write_text("plan.md", "\n".join(lines) + "\n")
    rundir.write_tuned(candidates[order[0]])
    result = {"run_dir": str(rundir.path), "predicted": True, "candidates": len(candidates),
              "feasible": int(feasible.sum()), "config": top[0]["config"],
              "predicted_tokens_per_s": top[0]["tokens_per_s"], "top": top, "scaling": scaling,
              "longest_sequence": counts}
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))
    return 0


def _longest_fits(candidates: list[RunConfig], predicted, feasible, longest: int  # noqa: ANN001
                  ) -> tuple[list[str], dict]:
    """How the configs that fit hold the longest sequence: in ChunkFlow's chunks, sharded
    over a context-parallel group, or whole on one device (and with what, if so)."""
    import pandas as pd

    def way(rc: RunConfig) -> str:
        if rc.schedule.policy == "chunkflow":
            return "in chunks (chunkflow)"
        return "sharded (cp > 1)" if rc.parallel.cp > 1 else "whole on one device"

    kinds = pd.Series([way(rc) for rc in candidates], index=predicted.index)
    out = [f"## How the longest sequence ({longest:,} tokens) fits", "",
           "| held | candidates | predicted to fit | best predicted tokens/s |",
           "|---|---:|---:|---:|"]
    counts = {}
    for kind in ("in chunks (chunkflow)", "sharded (cp > 1)", "whole on one device"):
        mine = kinds == kind
        fit = predicted[mine & feasible]
        counts[kind] = {"candidates": int(mine.sum()), "fit": len(fit)}
        best = f"{fit.tokens_per_s.max():,.0f}" if len(fit) else "-"
        out.append(f"| {kind} | {int(mine.sum())} | {len(fit)} | {best} |")
    whole = [candidates[i] for i in predicted.index[feasible & (kinds == "whole on one device")]]
    if not whole:
        out += ["", "Every config predicted to fit holds it in chunks or sharded."]
    else:
        how = sorted({f"checkpointing {rc.checkpointing.policy}, loss {rc.kernels.loss}, "
                      f"tp {rc.parallel.tp}" for rc in whole})
        out += ["", f"{len(whole)} configs are predicted to fit with it whole on one device, "
                    f"all of them with: {'; '.join(how)}."]
    return out, counts


def _plan_row(rc: RunConfig, row, predictor) -> dict:  # noqa: ANN001
    use = predictor.utilization(rc, float(row.tokens_per_s))
    return {"config": rc.label(), "nodes": rc.workload.hardware.nodes, "world": use["world"],
            "tokens_per_s": float(row.tokens_per_s),
            "tokens_per_s_per_device": use["tokens_per_s_per_device"], "mfu": use["mfu"],
            "step_time_s": float(row.step_time_s), "peak_mem_bytes": float(row.peak_mem_bytes)}


def _plan_table(rows: list[dict], *, nodes: bool = False) -> list[str]:
    first = "nodes | devices" if nodes else "rank"
    out = [f"| {first} | config | tokens/s | tokens/s per device | MFU | step s | peak GiB |",
           "|---|" + ("---|" if nodes else "") + "---|---:|---:|---:|---:|---:|"]
    for r, row in enumerate(rows, 1):
        lead = f"{row['nodes']} | {row['world']}" if nodes else str(r)
        out.append(f"| {lead} | `{row['config']}` | {row['tokens_per_s']:,.0f} | "
                   f"{row['tokens_per_s_per_device']:,.0f} | {row['mfu']:.1%} | "
                   f"{row['step_time_s']:.3f} | {row['peak_mem_bytes'] / 2**30:.1f} |")
    return out


def _scaling(args: argparse.Namespace, space, wl: Workload, candidates: list, predicted,  # noqa: ANN001
             order: list[int], predictor) -> list[dict]:  # noqa: ANN001
    """The best predicted config on 1, 2, 4, ... nodes up to the workload's: the knobs of
    the 50 best configs here, laid out again over each node count's devices and priced
    (the global batch stays the same, so tokens per device fall as nodes are added)."""
    from autotune.search import memory_limit

    counts = sorted({n for n in (1 << i for i in range(wl.hardware.nodes.bit_length()))
                     if n <= wl.hardware.nodes} | {wl.hardware.nodes})
    if len(counts) == 1:
        return []
    keep = {_knobs(candidates[i]) for i in order[:50]}
    cap = memory_limit(wl)
    rows = []
    for n in counts:
        if n == wl.hardware.nodes:
            best = order[0]
            rows.append(_plan_row(candidates[best], predicted.loc[best], predictor))
            continue
        wl_n = wl.model_copy(update={"hardware": wl.hardware.model_copy(update={"nodes": n})})
        cands = [rc for rc in space.grid(wl_n) if _knobs(rc) in keep]
        pred = predictor.predict_many(cands) if cands else None
        if pred is None or not (pred.peak_mem_bytes <= cap).any():
            continue
        best = pred[pred.peak_mem_bytes <= cap].tokens_per_s.idxmax()
        rows.append(_plan_row(cands[best], pred.loc[best], predictor))
    return rows


def _knobs(rc: RunConfig) -> str:
    """A config without its layout: what the scaling table carries across node counts."""
    return rc.model_copy(update={"workload": None, "parallel": None}).model_dump_json()


def _refuse_unfit(wl: Workload, predicted) -> None:  # noqa: ANN001
    """No candidate fits: one line naming the smallest predicted peak and what would help."""
    from autotune.search import MEMORY_MARGIN

    least = float(predicted.peak_mem_bytes.min())
    raise UserError(
        f"no candidate fits memory_cap_gb={wl.budget.memory_cap_gb:g} with a "
        f"{MEMORY_MARGIN:.0%} margin: the smallest predicted peak is {least / 2**30:.1f} GiB "
        f"per device; more devices (hardware.devices_per_node or nodes) shard the model "
        f"further, and smaller micro-batches or full checkpointing (--space) cut activations")
