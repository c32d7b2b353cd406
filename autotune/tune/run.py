"""A tuning run, start to end: the workload's candidates priced by the step model, the
untuned baseline measured first, a strategy driven against the measurement budget, the
baselines beside it, the finalists measured again interleaved, and the run directory
written (tuned.yaml, summary.json, report.md). ``autotune run`` and ``autotune worker`` are
two drivers of the same study: both prepare a ``Setting`` here and measure through it."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from autotune.config import RunConfig, SearchSpace, Workload, dump_yaml, load_yaml
from autotune.errors import UserError
from autotune.tune.plan import PLAN_FILES
from autotune.tune.rundir import RunDir, validate_name
from autotune.tune.sources import LiveSource, Recorded, ReplaySource, Source
from autotune.tune.strategies import BASELINES, Context, drive, make, memory_limit
from autotune.tune.study import Pick, Study, Trial, config_key
from profilers.progress import progress

__all__ = ["DEFAULT_BUDGET_S", "MAX_PRICED", "Options", "Setting", "TRIAL_START_S",
           "default_budget_s", "prepare", "tune"]

DEFAULT_BUDGET_S = 480.0  # `autotune run` with no arguments ends within 10 minutes
MAX_PRICED = 50_000  # larger spaces are sampled by TPE on the predictions, not priced whole
# Seconds a trial costs besides its steps: start-up (processes, imports, the model's build;
# on GPUs also NCCL, the allocator's warm-up and, for compiled blocks, their compile).
TRIAL_START_S = {"cpu": 10.0, "cuda": 120.0}


@dataclass
class Options:
    """What a run or a worker was asked for (the commands' flags, by the same names)."""

    workload: str = "tiny"
    device: str | None = None
    gpus: int | None = None
    nproc: int | None = None
    budget_trials: int | None = None
    budget_s: float | None = None
    batch: int = 3
    models: str | None = None
    space: str | None = None
    strategy: str = "guided"
    baselines: bool = False
    seed: int = 0
    predicted_trials: int = 3000
    steps: int = 3
    warmup: int = 1
    timeout: float = 600.0
    out: str | None = None
    resume: str | None = None
    storage: str | None = None
    memory_trace: bool = True
    replay: list[str] | None = None
    plan_only: bool = False
    confirm: int = 5

    @classmethod
    def of(cls, namespace: object) -> Options:
        """The options a command's parsed flags set; the rest keep their defaults."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)
                      if hasattr(namespace, f.name)})


@dataclass
class Setting:
    """A workload made ready to tune: its data, space, models, priced candidates and the
    untuned baseline every driver measures first."""

    workload: Workload
    user: RunConfig | None
    dataset: object
    space: SearchSpace
    models: object
    candidates: list[RunConfig]
    predicted: object
    baseline: RunConfig

    def context(self, opts: Options, budget: int) -> Context:
        return Context(self.candidates, self.models, user=self.baseline, seed=opts.seed,
                       budget=budget, batch=opts.batch, warmup=opts.warmup, steps=opts.steps,
                       predicted_trials=opts.predicted_trials)


def workload_of(opts: Options) -> tuple[Workload, RunConfig | None]:
    """The workload to tune with the command's hardware overrides, and the user's own
    config when ``--workload`` named a RunConfig."""
    from autotune.config import load_workload

    wl, user = load_workload(opts.workload)
    hw = wl.hardware.model_dump()
    if opts.gpus:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < opts.gpus and not opts.plan_only:
            raise UserError(f"--gpus {opts.gpus}: this machine has {have} CUDA device(s); add "
                            f"--plan-only to plan for them from the models alone (every figure "
                            f"predicted), or tune on CPU ranks with --device cpu --nproc N")
        hw.update(device="cuda", devices_per_node=opts.gpus)
    if opts.device:
        hw["device"] = opts.device
    if opts.nproc:
        hw["devices_per_node"] = opts.nproc
    wl = wl.model_copy(update={"hardware": type(wl.hardware).model_validate(hw)})
    return wl, user.model_copy(update={"workload": wl}) if user is not None else None


def _space(opts: Options, wl: Workload, longest: int) -> SearchSpace:
    """The user's SearchSpace, the resumed run's, or the built-in one for the workload's
    devices (``SearchSpace.default_for``)."""
    if opts.space:
        return load_yaml(SearchSpace, opts.space)
    for folder in (opts.resume, opts.out):
        if folder and (Path(folder) / "space.yaml").is_file():
            return load_yaml(SearchSpace, Path(folder) / "space.yaml")
    return SearchSpace.default_for(wl, longest=longest)


def _candidates(opts: Options, space: SearchSpace, wl: Workload, models) -> list[RunConfig]:  # noqa: ANN001
    """Every valid config of the space, or, past MAX_PRICED, the best of a TPE study on the
    predictions; with the Pareto strategy, NSGA-II's predicted front first."""
    from autotune.predict import StepPredictor
    from autotune.propose import SpaceEncoding, propose, space_size

    size = space_size(space, wl)
    pareto = opts.strategy == "pareto"
    if size <= MAX_PRICED and not pareto:
        return list(space.grid(wl))
    enc = (SpaceEncoding(space=space, workload=wl) if size > MAX_PRICED
           else SpaceEncoding(list(space.grid(wl))))
    predictor = StepPredictor(models, warmup=opts.warmup, steps=opts.steps)
    got = propose(enc, predictor, trials=opts.predicted_trials, keep=500, pareto=pareto,
                  cap_bytes=wl.budget.memory_cap_gb * 2**30, seed=opts.seed)
    how = "NSGA-II (throughput/memory front)" if pareto else "TPE"
    print(f"space of up to {size:,} configs: {opts.predicted_trials:,} predicted trials of "
          f"{how} proposed {len(got)} candidates", file=sys.stderr)
    return got


def prepare(opts: Options, wl: Workload, user: RunConfig | None) -> Setting:
    """Price the workload's space; refuse one with no candidate, or none that fits."""
    from autotune.cli.predict_cmd import load_models
    from autotune.data import load_lengths
    from autotune.portfolio import baseline_configs, ladder_fits
    from autotune.predict import StepPredictor

    dataset = load_lengths(wl.data, wl.model.resolve())  # planning and reports need no tokens
    space = _space(opts, wl, dataset.max_len)
    models = load_models(opts.models, wl.hardware)
    candidates = _candidates(opts, space, wl, models)
    if not candidates:
        raise UserError(f"no valid config of the search space fits {wl.world_size} device(s) "
                        f"of this workload")
    predicted = StepPredictor(models, warmup=opts.warmup, steps=opts.steps).predict_many(candidates)
    if predicted.peak_mem_bytes.min() > memory_limit(wl):
        _refuse_unfit(wl, predicted)
    # The baseline users run without tuning (their own config when they gave one) is
    # always measured first, so the report can say what tuning bought.
    baseline = space.canonical(user or baseline_configs(wl, fits=ladder_fits(wl, models))[0])
    return Setting(wl, user, dataset, space, models, candidates, predicted, baseline)


def _refuse_unfit(wl: Workload, predicted) -> None:  # noqa: ANN001
    """No candidate fits: one line naming the smallest predicted peak and what would help."""
    from autotune.tune.strategies import MEMORY_MARGIN

    least = float(predicted.peak_mem_bytes.min())
    raise UserError(
        f"no candidate fits memory_cap_gb={wl.budget.memory_cap_gb:g} with a "
        f"{MEMORY_MARGIN:.0%} margin: the smallest predicted peak is {least / 2**30:.1f} GiB "
        f"per device; more devices (hardware.devices_per_node or nodes) shard the model "
        f"further, and smaller micro-batches or full checkpointing (--space) cut activations")


def source_of(opts: Options, on_phase=None) -> Source:  # noqa: ANN001
    if opts.replay:
        return ReplaySource(opts.replay)
    return LiveSource(steps=opts.steps, warmup=opts.warmup, timeout_s=opts.timeout,
                      memory_trace=opts.memory_trace, on_phase=on_phase)


def open_run_dir(opts: Options, wl: Workload) -> tuple[RunDir, bool]:
    """The run directory and whether it continues one."""
    if opts.resume:
        path = Path(opts.resume)
        if not (path / "workload.yaml").is_file() or not (path / "run.json").is_file():
            raise UserError(f"--resume {path}: not a run directory (no workload.yaml and "
                            f"run.json); start one with `autotune run --out {path}`")
        return RunDir(path), True
    if opts.out:
        out = Path(opts.out)
        validate_name(out.name)
        if (out / "run.json").is_file():
            return RunDir(out), True  # the same command again continues the run
        # a folder holding only an earlier plan's files is planned into again
        if out.exists() and {f.name for f in out.iterdir()} - PLAN_FILES:
            raise UserError(f"--out {out} exists, is not empty and is not a run directory")
        out.mkdir(parents=True, exist_ok=True)
        return RunDir(out), False
    return RunDir.create(Path("results/runs"), f"{wl.model.label()}-{wl.data.label()}"), False


def default_budget_s(wl: Workload, predicted, trials: int, *, warmup: int, steps: int  # noqa: ANN001
                     ) -> float:
    """Seconds of measuring that ``trials`` of the best predicted candidates need (their
    median predicted step, the warm-up, timed and replayed steps, start-up), and never less
    than DEFAULT_BUDGET_S: an 8B model's trial takes minutes where a CPU's takes seconds."""
    fits = predicted[predicted.peak_mem_bytes <= memory_limit(wl)]
    best = fits.sort_values("tokens_per_s", ascending=False).head(10)
    step_s = float(best.step_time_s.median()) if len(best) else 0.0
    per_trial = TRIAL_START_S[wl.hardware.device] + (warmup + steps + 1) * step_s
    return max(DEFAULT_BUDGET_S, trials * per_trial)


class Recorder:
    """Measures a pick through the source and records it: in the study first (a kill loses
    nothing done), then the trial's folder copy. Configs in ``known`` (measured for another
    study of the run) are recorded again without measuring."""

    def __init__(self, study: Study, source: Source, rundir: RunDir, bar,  # noqa: ANN001
                 known: dict[str, Trial] | None = None) -> None:
        self.study, self.source, self.rundir, self.bar = study, source, rundir, bar
        self.known = known or {}

    def __call__(self, pick: Pick) -> Trial:
        n = self.study.next_number()
        self.bar.set_postfix_str(pick.rc.label())
        had = self.known.get(config_key(pick.rc))
        m = had.measurement if had else self.source(
            pick.rc, self.rundir.trial_path(n, self.study.name), tag=str(n))
        trial = Trial(n, pick.rc, m, pick.predicted_tokens_per_s, pick.predicted_peak_mem_bytes)
        self.study.add(trial)
        try:
            self.rundir.write_trial(trial, self.study.name)
        except OSError as exc:  # the folder is a copy: the search goes on
            self.bar.write(f"autotune: warning: trial {n}'s folder not written "
                           f"({exc.strerror or exc}); its measurement is in the study",
                           file=sys.stderr)
        self.bar.update()
        return trial


@dataclass
class Started:
    setting: Setting
    rundir: RunDir
    storage: str
    source: Source


def start(opts: Options) -> Started:
    """Everything a run checks before it measures, in the order that refuses bad input
    before any file is written; then the run directory's own files."""
    from autotune.launch import Launch
    from autotune.portfolio import baseline_configs

    wl, user = workload_of(opts)
    if opts.out:
        validate_name(Path(opts.out).name)
    if not opts.replay and not opts.plan_only:
        Launch.for_config(baseline_configs(wl)[0])  # refuse what this machine cannot host
    if opts.resume:
        open_run_dir(opts, wl)  # refuses what is not a run before any work
        wl = load_yaml(Workload, Path(opts.resume) / "workload.yaml")
    if opts.storage:  # an unreachable URL is refused before any file
        Study(opts.storage)
    setting = prepare(opts, wl, user)
    source = source_of(opts)
    rundir, resumed = open_run_dir(opts, wl)
    storage = opts.storage or f"sqlite:///{(rundir.path / 'study.db').resolve()}"
    if not resumed and not opts.plan_only:
        # The run folder is whole before its study exists: a run killed in between is a run
        # directory the same command continues, never a folder it refuses.
        rundir.write_workload(wl)
        rundir.write_text("space.yaml", dump_yaml(setting.space))
        _keep_models(setting.models, rundir.path)
        rundir.write_text("run.json", json.dumps({"storage": storage, "models": opts.models,
                                                  "replay": opts.replay}, indent=2) + "\n")
    return Started(setting, rundir, storage, source)


def _keep_models(models, path: Path) -> None:  # noqa: ANN001
    """The models the run priced with, and which profiles they were fitted on, kept with it:
    a report can be re-derived after models/ and profiles/ have moved on."""
    from profilers.store import atomic_write_text

    models.save(path / "models")
    store = Path("profiles") / "store.json"
    if models.families and store.is_file():
        atomic_write_text(path / "models" / "profiles_store.json", store.read_text())


@dataclass
class Outcome:
    """What a run measured: its trials (the baseline first), each baseline strategy's, and
    the finalists' confirmed verdicts."""

    trials: list[Trial]
    compared: dict[str, list[Trial]]
    found: dict
    finalists: dict

    @property
    def best(self) -> Trial | None:
        ok = [t for t in self.trials if t.ok]
        return max(ok, key=lambda t: t.measurement.tokens_per_s) if ok else None

    @property
    def tuned(self) -> str | None:
        """The confirmed tuned config: the best median among the search's finalists."""
        return next((n for n, v in self.found.items()
                     if n in ("tuned", "runner-up") and v.samples), None)


def search(opts: Options, run: Started) -> Outcome:
    """The baseline, then the strategy against the budget, then the baselines and the
    confirmation; everything recorded as it completes."""
    setting, rundir, storage, source = run.setting, run.rundir, run.storage, run.source
    study = Study(storage)
    done = study.trials()
    budget = opts.budget_trials or setting.workload.budget.trials
    deadline = time.monotonic() + (opts.budget_s or default_budget_s(
        setting.workload, setting.predicted, budget, warmup=opts.warmup, steps=opts.steps))
    bar = progress(total=budget, initial=len(done), unit="trial", desc="measuring")
    if isinstance(source, LiveSource):
        source.on_phase = bar.set_postfix_str
    # Configs a baseline measured before a kill are not measured again by the tuner.
    base_study = Study(storage, "baselines") if opts.baselines else None
    measure = Recorder(study, source, rundir, bar,
                       known={t.key: t for t in base_study.trials()} if base_study else None)
    if config_key(setting.baseline) not in {t.key for t in done}:
        done.append(measure(Pick(setting.baseline)))
    strategy = make(opts.strategy, setting.context(opts, budget))
    trials = drive(strategy, measure, budget=budget, history=done, deadline=deadline)
    bar.close()
    compared = _baselines(opts, setting, trials, base_study, source, rundir) if base_study else {}
    outcome = Outcome(trials, compared, {}, {})
    if opts.confirm and outcome.best is not None:
        outcome.found, outcome.finalists = _confirm(opts, outcome, setting.baseline, source,
                                                    rundir, storage)
    return outcome


def _baselines(opts: Options, setting: Setting, trials: list[Trial], study: Study,
               source: Source, rundir: RunDir) -> dict[str, list[Trial]]:
    """Each baseline at the tuner's measurement budget, sharing every measurement taken."""
    bar = progress(total=len(BASELINES) * len(trials), unit="trial", desc="baselines")
    known = Recorded(Recorder(study, source, rundir, bar), [*trials, *study.trials()])
    out = {}
    for name in BASELINES:
        before = bar.n
        strategy = make(name, setting.context(opts, len(trials)))
        out[name] = drive(strategy, known, budget=len(trials))
        bar.update(len(trials) - (bar.n - before))
    bar.close()
    return out


def _confirm(opts: Options, outcome: Outcome, baseline: RunConfig, source: Source,
             rundir: RunDir, storage: str) -> tuple[dict, dict]:
    """The finalists measured again, interleaved (``autotune.tune.verdict``)."""
    from autotune.measure import Status
    from autotune.tune.verdict import confirm, finalists

    ranked = sorted((t for t in outcome.trials if t.ok), key=lambda t: -t.measurement.tokens_per_s)
    configs = finalists(ranked, baseline, outcome.compared)
    # Each re-measurement is recorded as it completes, numbered by its round and place in
    # the round: the finalists of a resumed run are the same, so a killed confirmation
    # resumes where it stopped instead of measuring its rounds again.
    study = Study(storage, "confirm")
    done = {t.n: t for t in study.trials()}
    order = list(configs)
    bar = progress(total=opts.confirm * len(configs), unit="run", desc="confirming")

    def again(name: str, rc: RunConfig, r: int) -> float | None:
        bar.set_postfix_str(f"round {r + 1}: {name}")
        n = r * len(order) + order.index(name)
        if n not in done or done[n].key != config_key(rc):
            m = source(rc, rundir.confirm_path(r, name), tag=f"confirm-{r + 1}", repeat=r)
            done[n] = Trial(n, rc, m)
            study.add(done[n])
        bar.update()
        m = done[n].measurement
        return m.tokens_per_s if m.status is Status.COMPLETE else None

    found = confirm(configs, again, min_rounds=min(3, opts.confirm), max_rounds=opts.confirm)
    bar.close()
    return found, configs


def summarize(outcome: Outcome, setting: Setting, rundir: RunDir, opts: Options) -> dict:
    """summary.json: the run's result, and every figure its report is drawn from."""
    from autotune.predict import StepPredictor
    from autotune.tune.report import best_of, cost_breakdown

    best, tuned, found = outcome.best, outcome.tuned, outcome.found
    rc = (outcome.finalists[tuned] if tuned else best.rc) if best else None
    summary = {"run_dir": str(rundir.path),
               "tuned": str(rundir.path / "tuned.yaml") if best else None,
               "config": rc.label() if rc else None,
               "tokens_per_s": (found[tuned].median if tuned else
                                best.measurement.tokens_per_s if best else None),
               "search_tokens_per_s": best.measurement.tokens_per_s if best else None,
               "measured_trials": len(outcome.trials), "candidates": len(setting.candidates),
               "strategy": opts.strategy}
    if best is not None:
        predictor = StepPredictor(setting.models, warmup=opts.warmup, steps=opts.steps)
        summary["cost_breakdown"] = cost_breakdown(predictor, best, outcome.trials[0])
    if outcome.compared:
        summary["baselines"] = {name: best_of(ts) for name, ts in outcome.compared.items()}
    if found:
        summary["confirmed"] = {n: {"config": outcome.finalists[n].label(), **v.to_json_dict()}
                                for n, v in found.items()}
        summary["finalist"] = tuned  # which of them is the tuned config
    return summary


def render(outcome: Outcome, summary: dict, setting: Setting) -> str:
    """report.md, from the trials and summary.json's figures."""
    from autotune.tune import report

    best, calibration = outcome.best, setting.models.calibration
    text = report.header(workload_rc=outcome.trials[0].rc, dataset=setting.dataset,
                         trials=outcome.trials, best=best)
    if best is not None:
        text += "\n" + report.top5([t for t in outcome.trials if t.ok], best)
        text += "\n" + report.cost_section(summary["cost_breakdown"], calibration)
    if outcome.compared:
        text += "\n" + report.baselines_section(best, outcome.trials, summary["baselines"])
    if summary["strategy"] == "pareto":
        text += "\n" + report.front_section([t for t in outcome.trials if t.ok])
    if outcome.tuned:
        from autotune.tune.verdict import section

        text += "\n" + section(outcome.found, outcome.finalists, outcome.tuned)
    return text + "\n" + report.predicted_vs_measured(outcome.trials, calibration)


@dataclass
class Result:
    """summary.json's content, or with ``plan_only`` the plan's result and plan.md's text."""

    summary: dict
    plan_text: str | None = None


def tune(opts: Options) -> Result:
    """Run ``opts`` to the end and write the run directory."""
    run = start(opts)
    setting, rundir = run.setting, run.rundir
    if opts.plan_only:
        from autotune.tune.plan import plan

        return Result(*plan(rundir, setting.candidates, setting.predicted, setting.models,
                            setting.space, setting.dataset.max_len, warmup=opts.warmup,
                            steps=opts.steps))
    outcome = search(opts, run)
    summary = summarize(outcome, setting, rundir, opts)
    if outcome.best is not None:
        rundir.write_tuned(outcome.finalists[outcome.tuned] if outcome.tuned else outcome.best.rc)
    rundir.write_text("report.md", render(outcome, summary, setting))
    rundir.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    return Result(summary)
