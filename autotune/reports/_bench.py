"""The report of a bench directory (``autotune bench SUITE --out OUT``): scores of every
contender, the runs that aborted and why, the machine, and the plots of time to train,
throughput, eval loss over time and the data's sequence lengths.

The layout it reads::

    suite.yaml                      name, workload, contenders, runs, quality_target, time_limit_s
    fingerprint.json                the machine (any JSON object)
    lengths.json                    {"lengths": [...]} of the workload's training data
    tuned/                          the ``autotune run`` directory of the tuned contender
    runs/<contender>/<i>/result.json   one run
    scores.json                     the runner's scores per contender
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from autotune.config import load_yaml, parse_config
from autotune.errors import UserError
from autotune.markdown import md_table
from autotune.reports._figures import Figure, Report, axes, figure_markdown, length_histogram, to_png

__all__ = ["BenchDir", "bench_report"]


class _Read(BaseModel):
    # The bench runner owns these files and may add fields; the report checks the ones it
    # reads, so a renamed or mistyped field is refused with the file named.
    model_config = ConfigDict(extra="ignore")


class EvalPoint(_Read):
    wall_s: float
    step: int
    eval_loss: float


class Compliance(_Read):
    ok: bool
    output: str


class BenchRun(_Read):
    contender: str
    run: int
    seed: int
    status: Literal["success", "aborted", "failed"]
    reason: str | None
    time_to_train_s: float | None
    wall_s: float
    tokens_per_s: float | None
    eval: list[EvalPoint]
    compliance: Compliance


class ContenderScore(_Read):
    runs: int
    successes: int
    olympic_mean_s: float | None
    min_s: float | None
    max_s: float | None
    tokens_per_s_median: float | None
    mfu_median: float | None
    energy_j_median: float | None
    speedup_of_tuned: float | None
    # 95% bootstrap interval of the speedup; absent in scores written before it was kept
    speedup_low: float | None = None
    speedup_high: float | None = None


class Scores(_Read):
    contenders: dict[str, ContenderScore]
    tuned: str | None


class Suite(_Read):
    name: str
    workload: str | dict[str, Any]
    contenders: list[str]
    runs: int
    quality_target: dict[str, float]
    time_limit_s: float


class _Lengths(_Read):
    lengths: list[int]


M = TypeVar("M", bound=BaseModel)


def _read_json(cls: type[M], path: Path) -> M:
    return parse_config(cls, _json(path), source=str(path))


def _json(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not JSON ({exc})") from None


def _tuned_config(summary: Path) -> str | None:
    """The label of the config ``autotune run`` handed back, as its summary.json names it."""
    if not summary.is_file():
        return None
    data = _json(summary)
    return data.get("config") if isinstance(data, dict) else None


@dataclass(frozen=True, slots=True)
class BenchDir:
    """Everything the report reads from a bench directory, checked on load."""

    path: Path
    suite: Suite
    scores: Scores
    runs: list[BenchRun]
    fingerprint: dict[str, Any]
    lengths: np.ndarray | None
    tuned_config: str | None

    @classmethod
    def load(cls, path: Path) -> BenchDir:
        suite = load_yaml(Suite, path / "suite.yaml")
        runs = [_read_json(BenchRun, p) for p in sorted(path.glob("runs/*/*/result.json"))]
        if not runs:
            raise UserError(f"{path / 'runs'}: no <contender>/<i>/result.json in it; `autotune "
                            f"bench` has finished no run here")
        fingerprint = _json(path / "fingerprint.json")
        if not isinstance(fingerprint, dict):
            raise UserError(f"{path / 'fingerprint.json'}: expected a JSON object")
        has_lengths = (path / "lengths.json").is_file()
        lengths = np.array(_read_json(_Lengths, path / "lengths.json").lengths) if has_lengths else None
        order = {c: i for i, c in enumerate(suite.contenders)}
        runs.sort(key=lambda r: (order.get(r.contender, len(order)), r.contender, r.run))
        return cls(path, suite, _read_json(Scores, path / "scores.json"), runs, fingerprint,
                   lengths, _tuned_config(path / "tuned" / "summary.json"))

    @property
    def contenders(self) -> list[str]:
        """The suite's contenders that have runs or scores, in the suite's order."""
        seen = {r.contender for r in self.runs} | set(self.scores.contenders)
        return [c for c in self.suite.contenders if c in seen] + sorted(
            seen - set(self.suite.contenders))

    def runs_of(self, contender: str) -> list[BenchRun]:
        return [r for r in self.runs if r.contender == contender]


def _colors(names: list[str]) -> dict[str, str]:
    return {c: f"C{i % 10}" for i, c in enumerate(names)}


def _spread(n: int) -> np.ndarray:
    """Offsets that set a contender's runs side by side instead of on top of each other."""
    return np.linspace(-0.15, 0.15, n) if n > 1 else np.zeros(n)


def _label(seen: set[str], label: str) -> str:
    """A legend entry once, however many contenders draw it (matplotlib leaves labels that
    start with an underscore out of the legend)."""
    if label in seen:
        return f"_{label}"
    seen.add(label)
    return label


def _time_to_train(b: BenchDir) -> Figure:
    name, title = "time_to_train", "Time to train per contender"
    if not any(r.time_to_train_s is not None for r in b.runs):
        return Figure(name, title, "time to train per contender",
                      missing="no run reached the quality target.")
    names = b.contenders
    seen: set[str] = set()
    colors = _colors(names)
    fig, ax = axes()
    for i, c in enumerate(names):
        score = b.scores.contenders.get(c)
        if score is not None and score.olympic_mean_s is not None:
            ax.bar(i, score.olympic_mean_s, width=0.6, color=colors[c], alpha=0.3,
                   label=_label(seen, "olympic mean"))
        runs = b.runs_of(c)
        for dx, r in zip(_spread(len(runs)), runs):
            if r.time_to_train_s is not None:
                ax.scatter(i + dx, r.time_to_train_s, color=colors[c], zorder=3,
                           label=_label(seen, "run that reached the target"))
            else:
                ax.scatter(i + dx, r.wall_s, marker="x", s=60, color="C3", zorder=3,
                           label=_label(seen, "aborted or failed run, at its wall time"))
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="seconds to the quality target", ylim=(0, None),
           title=f"Time to train, {b.suite.runs} runs per contender")
    ax.legend(loc="best", fontsize="small")
    aborted = sum(r.status != "success" for r in b.runs)
    alt = (f"Time to train of each run per contender with its olympic mean as a bar; "
           f"{aborted} aborted or failed runs marked with a cross")
    return Figure(name, title, alt, png=to_png(fig))


def _throughput(b: BenchDir) -> Figure:
    name, title = "throughput", "Throughput per contender"
    if not any(r.tokens_per_s is not None for r in b.runs):
        return Figure(name, title, "throughput per contender",
                      missing="no run recorded its tokens per second.")
    names = b.contenders
    seen: set[str] = set()
    colors = _colors(names)
    fig, ax = axes()
    for i, c in enumerate(names):
        runs = [(r, r.tokens_per_s) for r in b.runs_of(c) if r.tokens_per_s is not None]
        if runs:
            tps = [t for _, t in runs]
            ax.vlines(i, min(tps), max(tps), color=colors[c], alpha=0.5,
                      label=_label(seen, "min to max over runs"))
        for dx, (r, t) in zip(_spread(len(runs)), runs):
            ok = r.status == "success"
            ax.scatter(i + dx, t, color=colors[c] if ok else "C3",
                       marker="o" if ok else "x", zorder=3,
                       label=_label(seen, "run" if ok else "aborted or failed run"))
        score = b.scores.contenders.get(c)
        if score is not None and score.tokens_per_s_median is not None:
            ax.hlines(score.tokens_per_s_median, i - 0.25, i + 0.25, color="k",
                      label=_label(seen, "median (scores.json)"))
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="tokens per second", ylim=(0, None), title="Training throughput, every run")
    ax.legend(loc="best", fontsize="small")
    alt = "Tokens per second of every run per contender, with the median and the min to max spread"
    return Figure(name, title, alt, png=to_png(fig))


def _eval_loss(b: BenchDir) -> Figure:
    name, title = "eval_loss", "Eval loss against wall-clock time"
    if not any(r.eval for r in b.runs):
        return Figure(name, title, "eval loss against time", missing="no run recorded an evaluation.")
    colors = _colors(b.contenders)
    seen: set[str] = set()
    fig, ax = axes()
    for r in b.runs:
        if r.eval:
            ok = r.status == "success"
            ax.plot([e.wall_s for e in r.eval], [e.eval_loss for e in r.eval], marker=".",
                    color=colors[r.contender], linestyle="-" if ok else "--", alpha=0.8,
                    label=_label(seen, r.contender))
    target = b.suite.quality_target.get("eval_loss")
    if target is not None:
        ax.axhline(target, color="k", linestyle=":", label=f"quality target {target:g}")
    ax.set(xlabel="wall-clock seconds since the run started", ylabel="eval loss",
           title="Eval loss of every run (dashed: aborted or failed)")
    ax.legend(loc="best", fontsize="small")
    alt = (f"Eval loss against wall-clock seconds for each of {len(b.runs)} runs, coloured by "
           f"contender, with the quality target as a horizontal line")
    return Figure(name, title, alt, png=to_png(fig))


def _lengths(b: BenchDir) -> Figure:
    return length_histogram(b.lengths, source=f"workload of suite {b.suite.name}",
                            missing="the bench directory has no lengths.json.")


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{format(v, spec)}{suffix}"


def _scores_table(b: BenchDir) -> str:
    tuned = b.scores.tuned or "tuned"
    rows = {}
    for c in b.contenders:
        s = b.scores.contenders.get(c)
        if s is None:
            continue
        spread = (f"{s.min_s:,.1f}–{s.max_s:,.1f}" if s.min_s is not None and s.max_s is not None
                  else "-")
        energy = _fmt(None if s.energy_j_median is None else s.energy_j_median / 1e3, ",.2f", " kJ")
        rows[f"`{c}`"] = {
            "runs": s.runs, "successes": s.successes,
            "olympic mean time to train (s)": _fmt(s.olympic_mean_s, ",.1f"),
            "min–max (s)": spread, f"speedup of `{tuned}`": _fmt(s.speedup_of_tuned, ".2f", "x"),
            "95% interval": _interval(s.speedup_low, s.speedup_high),
            "tokens/s (median)": _fmt(s.tokens_per_s_median, ",.0f"),
            "MFU (median)": _fmt(s.mfu_median, ".1%"), "energy (median)": energy}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "contender"
    return md_table(df)


def _interval(low: float | None, high: float | None) -> str:
    """The speedup's interval; no upper end where resampled runs missing the target make it
    unbounded."""
    if low is None:
        return "-"
    return f"{low:.2f}–{high:.2f}x" if high is not None else f"≥ {low:.2f}x"


def _problems(b: BenchDir) -> list[str]:
    bad = [r for r in b.runs if r.status != "success"]
    out = ["## Aborted and failed runs", ""]
    if not bad:
        out += ["Every run reached the quality target.", ""]
    else:
        out += ["| contender | run | seed | status | after (s) | reason |", "|---|---:|---:|---|---:|---|"]
        out += [f"| `{r.contender}` | {r.run} | {r.seed} | {r.status} | {r.wall_s:,.1f} | "
                f"{_cell(r.reason or 'no reason recorded')} |" for r in bad]
        out.append("")
    failed = [r for r in b.runs if not r.compliance.ok]
    if failed:
        out += ["Runs whose MLPerf log failed the compliance check: "
                + ", ".join(f"`{r.contender}` run {r.run} ({_cell(r.compliance.output, 120)})"
                            for r in failed) + ".", ""]
    return out


def _cell(text: str, limit: int = 200) -> str:
    """Free text (a reason, a checker's output) as one table cell: one line, no pipes."""
    line = " ".join(text.split()).replace("|", "/")
    return line if len(line) <= limit else line[:limit - 3] + "..."


# The fingerprint is the runner's free-form JSON; these are the fields a reader compares
# machines by.
_MACHINE_KEYS = re.compile(r"host|cpu|device|torch|cuda|driver|thread", re.IGNORECASE)


def _machine(b: BenchDir) -> list[str]:
    fields = {k: v for k, v in b.fingerprint.items()
              if _MACHINE_KEYS.search(k) and not isinstance(v, (dict, list))}
    out = ["## Machine", ""]
    if not fields:
        return out + ["fingerprint.json names no host, CPU, device or torch field.", ""]
    out += ["| field | value |", "|---|---|"]
    out += [f"| {k} | {_cell(str(v))} |" for k, v in fields.items()]
    return out + ["", "From `fingerprint.json`, which holds the whole fingerprint.", ""]


def bench_report(b: BenchDir) -> Report:
    """report.md of a bench directory, its figures referenced from ``figures/``."""
    figures = [_time_to_train(b), _throughput(b), _eval_loss(b), _lengths(b)]
    suite = b.suite
    target = ", ".join(f"{k} {v:g}" for k, v in suite.quality_target.items())
    workload = suite.workload if isinstance(suite.workload, str) else "given inline in suite.yaml"
    tuned = b.scores.tuned or "tuned"
    lines = [
        f"# autotune bench report: {suite.name}", "",
        f"- workload: {workload}",
        f"- contenders: {', '.join(f'`{c}`' for c in suite.contenders)}; {suite.runs} runs each",
        f"- quality target: {target} (a run's time to train is how long it took to reach it); "
        f"time limit {suite.time_limit_s:,.0f} s per run",
    ]
    if b.tuned_config:
        lines.append(f"- `{tuned}` is `{b.tuned_config}`, tuned by `autotune run` in `tuned/` "
                     f"(`autotune report {b.path / 'tuned'}` draws that run's figures)")
    lines += [
        "", "## Scores", "", _scores_table(b), "",
        f"Olympic mean: MLPerf's score, the mean time to train with the fastest and the "
        f"slowest run dropped, as the runner scored it in `scores.json`. Speedup of `{tuned}`: a "
        f"contender's olympic mean over `{tuned}`'s; above 1x, `{tuned}` trains to the target "
        f"faster. Tokens/s, MFU and energy are medians over the runs. \"-\": not recorded, or "
        f"too few runs reached the target.", "",
        "## Figures", "", *(figure_markdown(f) for f in figures),
        *_problems(b), *_machine(b),
    ]
    return Report(f"autotune bench report: {suite.name}", "\n".join(lines), figures)
