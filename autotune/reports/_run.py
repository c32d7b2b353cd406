"""The figures of a run directory (``autotune run``), added under the run's own report.md:
predicted against measured throughput, the search history, the throughput/memory front,
the tuned config's cost breakdown and the workload's sequence lengths."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from autotune.config import RunConfig, Workload, load_yaml
from autotune.errors import UserError
from autotune.reports._figures import Figure, Report, axes, figure_markdown, length_histogram, to_png
from autotune.tune.study import Trial
from profilers.records import Measurement, Status

__all__ = ["FIGURES_HEADING", "RunRecord", "run_report"]

# The tuner's modules (strategies, calibrate, propose, data) are imported where they are used:
# they load torch, which a bench report never needs.

# `autotune report` owns report.md from this heading on: run again, it replaces its own
# section instead of adding a second one, and the run's text above stays as the run wrote it.
FIGURES_HEADING = "## Figures"


@dataclass(frozen=True, slots=True)
class RunRecord:
    """What the figures of a run directory are drawn from, read and checked on load.

    ``trials`` are the tuner's measured trials (``trials/<n>/``), in order; the
    strategies ``--baselines`` compares against number theirs after the tuner's, and are
    left out as the run's own report leaves them out of its search.
    """

    path: Path
    text: str
    trials: list[Trial]
    predicted: dict[int, float] | None
    predicted_missing: str
    lengths: np.ndarray | None
    lengths_missing: str
    cost_breakdown: dict | None

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        text = (path / "report.md").read_text(encoding="utf-8", errors="replace")
        text = text.split(f"\n{FIGURES_HEADING}\n")[0].rstrip("\n") + "\n"
        try:
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path / 'summary.json'}: not JSON ({exc})") from None
        if not isinstance(summary, dict):
            raise UserError(f"{path / 'summary.json'}: expected a JSON object")
        trials = _trials(path, summary.get("measured_trials"))
        predicted, predicted_missing = _predictions(path)
        lengths, lengths_missing = _lengths(path)
        return cls(path, text, trials, predicted, predicted_missing, lengths,
                   lengths_missing, summary.get("cost_breakdown"))


def _trials(path: Path, measured: int | None) -> list[Trial]:
    out = []
    for d in sorted(path.glob("trials/*")):
        if not d.name.isdigit() or not (d / "metrics.json").is_file():
            continue  # b<n>/ are a baseline's work folders, its record is under its number
        n = int(d.name)
        if measured is not None and n >= measured:
            continue
        rc = load_yaml(RunConfig, d / "config.yaml")
        try:
            m = Measurement.model_validate_json((d / "metrics.json").read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise UserError(f"{d / 'metrics.json'}: not a measurement "
                            f"({exc.errors()[0]['msg']})") from None
        out.append(Trial(n, rc, m))
    return sorted(out, key=lambda t: t.n)


def _predictions(path: Path) -> tuple[dict[int, float] | None, str]:
    """Each trial's predicted tokens/s, at the machine's reference speed, from the run's
    Optuna study: the one place a run keeps them."""
    from autotune.tune.study import Study

    db = path / "study.db"
    if not db.is_file():
        return None, ("the run directory has no study.db (the predictions live in the run's "
                      "Optuna study; this run kept it elsewhere with --storage).")
    try:
        trials = Study(f"sqlite:///{db.resolve()}").trials()
    except UserError as exc:
        return None, f"study.db could not be read: {exc}"
    return {t.n: t.predicted_tokens_per_s for t in trials if t.predicted_tokens_per_s}, ""


def _lengths(path: Path) -> tuple[np.ndarray | None, str]:
    from autotune.data import load_dataset

    if not (path / "workload.yaml").is_file():
        return None, "the run directory has no workload.yaml."
    try:
        wl = load_yaml(Workload, path / "workload.yaml")
        return load_dataset(wl.data, wl.model.resolve()).lengths, ""
    except UserError as exc:
        return None, f"the workload's data could not be loaded: {exc}"


def _measured_at_reference(m: Measurement) -> float | None:
    """Measured tokens/s scaled to the machine's reference speed, as the run's own
    predicted-against-measured table scales it (predictions are made at that speed)."""
    return m.tokens_per_s * m.drift if m.tokens_per_s else None


def _predicted_vs_measured(r: RunRecord) -> Figure:
    name, title = "predicted_vs_measured", "Predicted against measured tokens/s"
    pairs = [(r.predicted[t.n], _measured_at_reference(t.measurement)) for t in r.trials
             if r.predicted and t.n in r.predicted and _measured_at_reference(t.measurement)]
    if not pairs:
        return Figure(name, title, "predicted against measured tokens/s",
                      missing=r.predicted_missing or "no trial has both a prediction and a "
                                                     "completed measurement.")
    pred, meas = np.array(pairs).T
    fig, ax = axes()
    ax.scatter(pred, meas, color="C0", zorder=3, label="trial")
    lo, hi = min(pred.min(), meas.min()) / 1.5, max(pred.max(), meas.max()) * 1.5
    ax.plot([lo, hi], [lo, hi], color="k", linestyle="--", label="measured = predicted")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi),
           xlabel="predicted tokens/s (before measuring)", ylabel="measured tokens/s",
           title="Step model's prediction of each measured trial")
    ax.legend(loc="upper left")
    ratio = float(np.median(meas / pred))
    alt = (f"Log-log scatter of predicted against measured tokens/s for {len(pred)} trials, with "
           f"the line where they are equal; median measured over predicted {ratio:.2f}")
    return Figure(name, title, alt, png=to_png(fig))


def _search_history(r: RunRecord) -> Figure:
    name, title = "search_history", "Search history"
    if not r.trials:
        return Figure(name, title, "search history", missing="the run directory has no trials/.")
    n = np.array([t.n for t in r.trials])
    tps = np.array([t.measurement.tokens_per_s or np.nan for t in r.trials])
    ok = np.array([t.measurement.status is Status.COMPLETE for t in r.trials])
    fig, ax = axes()
    ax.scatter(n[ok], tps[ok], color="C0", zorder=3, label="measured trial")
    if (~ok).any():
        ax.scatter(n[~ok], np.zeros((~ok).sum()), marker="x", s=60, color="C3", zorder=3,
                   label="failed (OOM, timeout, crash), drawn at 0")
    if ok.any():
        best = np.fmax.accumulate(np.where(ok, tps, -np.inf))
        shown = best > -np.inf
        ax.step(n[shown], best[shown], where="post", color="C1", label="best so far")
    ax.set(xlabel="trial (0: the pad-batch baseline or your own config)", ylabel="measured tokens/s",
           ylim=(0, None), title=f"{len(n)} measured trials in the order the tuner measured them")
    ax.legend(loc="lower right")
    alt = (f"Measured tokens/s of {len(n)} trials by trial number, {int((~ok).sum())} failed, "
           f"with the best so far as a step line")
    return Figure(name, title, alt, png=to_png(fig))


def _pareto(r: RunRecord) -> Figure:
    from autotune.propose import pareto_front

    name, title = "pareto", "Throughput against peak memory"
    done = [t for t in r.trials if t.measurement.status is Status.COMPLETE
            and t.measurement.tokens_per_s and t.measurement.peak_mem_bytes]
    if len(done) < 2:
        return Figure(name, title, "throughput against peak memory",
                      missing="fewer than two trials completed with a peak memory recorded.")
    mib = np.array([(t.measurement.peak_mem_bytes or 0) / 2**20 for t in done])
    tps = np.array([t.measurement.tokens_per_s for t in done])
    front = sorted(pareto_front(list(zip(tps, mib))), key=lambda i: mib[i])
    fig, ax = axes()
    ax.scatter(mib, tps, color="C7", alpha=0.7, label="measured trial")
    ax.step(mib[front], tps[front], where="post", color="C3", marker="o", zorder=3,
            label="Pareto front: none beats it on both")
    mid = (mib.min() + mib.max()) / 2
    for k, i in enumerate(front):
        # Labels point inwards (and alternate above and below: neighbours on a front sit
        # close) so that none leaves the axes and squeezes the plot to make room for it.
        right = mib[i] > mid
        ax.annotate(done[i].rc.label(), (mib[i], tps[i]), textcoords="offset points",
                    xytext=(-6 if right else 6, -12 if k % 2 else 6),
                    ha="right" if right else "left", fontsize="x-small")
    ax.margins(y=0.12)  # room for the labels of the highest and lowest points
    ax.set(xlabel="peak tensor memory (MiB)", ylabel="measured tokens/s",
           title="More throughput costs memory along the front")
    ax.legend(loc="best")
    alt = (f"Measured tokens/s against peak tensor memory for {len(done)} completed trials, the "
           f"{len(front)} on the Pareto front highlighted and labelled")
    return Figure(name, title, alt, png=to_png(fig))


def _cost_breakdown(r: RunRecord) -> Figure:
    """The tuned config's predicted seconds per step by part, beside the baseline's (trial
    0), as the run priced them with its own models (summary.json's ``cost_breakdown``)."""
    name, title = "cost_breakdown", "Cost breakdown of the tuned config"
    data = r.cost_breakdown
    if not data or not data.get("parts"):
        return Figure(name, title, "cost breakdown of the tuned config",
                      missing="the run's summary.json has no cost breakdown of a tuned config "
                              "(no candidate completed, or the run predates it).")
    configs, parts = data["configs"], list(data["parts"])
    values = np.array([data["parts"][k] for k in parts], dtype=float)
    fig, ax = axes()
    y, h = np.arange(len(parts)), 0.8 / len(configs)
    for j, c in enumerate(configs):
        ax.barh(y + (j - (len(configs) - 1) / 2) * h, values[:, j], height=h, color=f"C{j}",
                label=f"{c} ({'tuned' if j == 0 else 'baseline, trial 0'})")
    ax.set_yticks(y, parts)
    ax.invert_yaxis()
    ax.set(xlabel="seconds per optimizer step (predicted by the step model)",
           title="Where the step time goes")
    ax.legend(loc="best", fontsize="small")
    alt = (f"Horizontal bars of the predicted seconds per step of {len(parts)} parts for "
           + " and ".join(configs))
    return Figure(name, title, alt, png=to_png(fig))


def _lengths_figure(r: RunRecord) -> Figure:
    return length_histogram(r.lengths, source="the run's workload", missing=r.lengths_missing)


def run_report(r: RunRecord) -> Report:
    """The run's own report.md, its figures added in a section of their own at the end."""
    figures = [_predicted_vs_measured(r), _search_history(r), _pareto(r), _cost_breakdown(r),
               _lengths_figure(r)]
    text = (r.text + f"\n{FIGURES_HEADING}\n\nDrawn by `autotune report` from this directory's "
            "trials/, study.db, workload.yaml and summary.json.\n\n"
            + "\n".join(figure_markdown(f) for f in figures))
    title = next((line[2:] for line in r.text.splitlines() if line.startswith("# ")),
                 "autotune run report")
    return Report(f"{title}: {r.path.name}", text, figures)
