"""report.md of a run, rendered from what the run recorded: its trials (the study), its
summary (summary.json) and the models it priced with. The tuned config, every measured
candidate, why the winner won, the baselines, the confirmed verdicts."""

from __future__ import annotations

import numpy as np

from autotune.config import RunConfig, dump_yaml
from autotune.data import Dataset, Lengths
from autotune.tune.study import Trial

__all__ = ["baselines_section", "best_of", "cost_breakdown", "cost_section", "front_section",
           "header", "predicted_vs_measured", "top5", "trial_table"]


def _fmt(v: float | None, spec: str) -> str:
    """A figure a recorded measurement may lack (replayed tables keep what they kept)."""
    return "-" if v is None else format(v, spec)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def trial_table(trials: list[Trial], baseline: float | None) -> list[str]:
    rows = ["| # | config | status | tokens/s | vs pad-batch | step s (median, IQR) | "
            "peak tensor MiB | peak RSS MiB | MFU | padding |",
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    order = sorted(trials, key=lambda t: -(t.measurement.tokens_per_s or -1))
    for n, rc, m in ((t.n, t.rc, t.measurement) for t in order):
        if m.status.value == "COMPLETE":
            ratio = f"{m.tokens_per_s / baseline:.2f}x" if baseline else "-"
            rows.append(
                f"| {n} | `{rc.label()}` | {m.status.value} | {m.tokens_per_s:,.0f} | {ratio} | "
                f"{_fmt(m.step_time_s, '.3f')} ({_fmt(m.step_time_iqr_s, '.3f')}) | "
                f"{_mib(m.peak_mem_bytes)} | {_mib(m.peak_rss_bytes)} | {_fmt(m.mfu, '.1%')} | "
                f"{m.extra.get('padding_fraction', 0):.0%} |")
        else:
            rows.append(f"| {n} | `{rc.label()}` | {m.status.value}: {m.reason[:80]} | - | - | "
                        f"- | - | {_mib(m.peak_rss_bytes)} | - | - |")
    return rows


def _why(best: Trial, base: Trial | None) -> list[str]:
    rc, m = best.rc, best.measurement
    lines = [f"`{rc.label()}` processed the most real tokens per second of every candidate "
             f"that completed within the memory cap."]
    if base is not None and base.ok:
        bm = base.measurement
        pad = bm.extra.get("padding_fraction", 0.0)
        lines.append(
            f"Against `pad-batch` (the Hugging Face Trainer's default collation), which spent "
            f"{pad:.0%} of its tokens on padding, it is {m.tokens_per_s / bm.tokens_per_s:.2f}x "
            f"faster at {_mib(m.peak_mem_bytes)} MiB peak tensor memory instead of "
            f"{_mib(bm.peak_mem_bytes)} MiB.")
    if rc.schedule.policy == "chunkflow":
        lines.append(f"ChunkFlow splits sequences longer than {rc.schedule.chunk_size} tokens "
                     f"into dependent chunks and keeps activations for the last "
                     f"{rc.schedule.chunkflow_k}, so peak memory follows the chunk size, not "
                     f"the longest sequence; it recomputed "
                     f"{m.extra.get('recomputed_tokens_per_step', 0):,.0f} tokens per step.")
    return lines


def header(*, workload_rc: RunConfig, dataset: Dataset | Lengths, trials: list[Trial],
           best: Trial | None) -> str:
    """The run's workload, its tuned config, why it won and every measured candidate."""
    dims = workload_rc.workload.model.resolve()
    wl = workload_rc.workload
    lengths = dataset.lengths
    base = next((t for t in trials if t.rc.schedule.policy == "pad-batch"), None)
    base_tps = base.measurement.tokens_per_s if base and base.ok else None
    fp = next((t.measurement.fingerprint for t in trials if t.measurement.fingerprint), None)
    device = f"{fp.device_kind}: {fp.device_name}, {fp.threads} threads" if fp else wl.hardware.device
    out = [
        "# autotune run report", "",
        f"- model: {wl.model.label()} ({dims.total_params() / 1e6:,.1f} M parameters, "
        f"{dims.layers} layers, hidden {dims.hidden})",
        f"- data: {dataset.source}, {len(lengths):,} sequences, length mean "
        f"{lengths.mean():,.0f}, median {np.median(lengths):,.0f}, max {lengths.max():,}",
        f"- budget: {wl.budget.global_batch_tokens:,} real tokens per step, memory cap "
        f"{wl.budget.memory_cap_gb} GiB",
        f"- measured on {device}. Figures measured on a CPU are CPU figures, not GPU figures.",
        "",
    ]
    if best is None:
        out += ["**No candidate completed.** Every trial's status and reason is below; the "
                "logs are in `trials/<n>/log.txt`.", ""]
    else:
        n, rc, m = best.n, best.rc, best.measurement
        out += ["## Tuned config", "",
                f"Trial {n}, `{rc.label()}`: **{m.tokens_per_s:,.0f} tokens/s** (effective, "
                f"padding excluded), median step {_fmt(m.step_time_s, '.3f')} s over "
                f"{m.timed_steps} timed steps, MFU {_fmt(m.mfu, '.1%')} of the measured matmul "
                f"ceiling.", "",
                "```yaml", dump_yaml(rc).rstrip(), "```", "",
                "## Why this config", "", *_why(best, base), ""]
    out += ["## Measured candidates", "", *trial_table(trials, base_tps), ""]
    return "\n".join(out)


def top5(ok: list[Trial], best: Trial) -> str:
    top = sorted(ok, key=lambda t: -t.measurement.tokens_per_s)[:5]
    lines = ["## Top 5 measured", "",
             "| rank | config | measured tokens/s | of the tuned | predicted before measuring |",
             "|---:|---|---:|---:|---:|"]
    for r, t in enumerate(top, 1):
        pred = f"{t.predicted_tokens_per_s:,.0f}" if t.predicted_tokens_per_s else "-"
        lines.append(f"| {r} | `{t.rc.label()}` | {t.measurement.tokens_per_s:,.0f} | "
                     f"{t.measurement.tokens_per_s / best.measurement.tokens_per_s:.0%} | {pred} |")
    return "\n".join(lines) + "\n"


def best_of(trials: list[Trial]) -> dict:
    ok = [t for t in trials if t.ok and t.measurement.tokens_per_s]
    best = max(ok, key=lambda t: t.measurement.tokens_per_s) if ok else None
    return {"measurements": len(trials), "config": best.rc.label() if best else None,
            "tokens_per_s": best.measurement.tokens_per_s if best else None}


def baselines_section(best: Trial | None, trials: list[Trial], compared: dict[str, dict]) -> str:
    """``compared``: each strategy's ``best_of`` its trials, as summary.json keeps it."""
    from autotune.tune.strategies import BASELINES

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
    for name, b in compared.items():
        ratio = f"{tuned / b['tokens_per_s']:.2f}x" if tuned and b["tokens_per_s"] else "-"
        lines.append(f"| {name}: {BASELINES[name]} | {b['measurements']} | "
                     f"`{b['config'] or '-'}` | {b['tokens_per_s'] or 0:,.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def cost_breakdown(predictor, best: Trial, base: Trial) -> dict:  # noqa: ANN001 - StepPredictor
    """Where the winner's step time goes against the pad-batch baseline's, as the step model
    prices them (seconds per optimizer step by part): kept in summary.json, drawn from
    there by ``autotune report``."""
    rows = [best] if base.rc.model_dump_json() == best.rc.model_dump_json() else [best, base]
    priced = [predictor.predict(t.rc) for t in rows]
    parts = [k for k in priced[0].breakdown
             if any(abs(p.breakdown.get(k, 0)) > 1e-6 for p in priced)]
    return {"configs": [t.rc.label() for t in rows],
            "parts": {k: [p.breakdown.get(k, 0.0) for p in priced] for k in parts},
            "step_predicted_s": [p.step_time_s for p in priced],
            "step_measured_s": [t.measurement.step_time_s if t.ok else None for t in rows]}


def cost_section(data: dict, calibration: str) -> str:
    head = " | ".join(f"`{c}`" for c in data["configs"])
    lines = ["## Cost breakdown of the tuned config", "",
             f"Seconds per optimizer step as the step model prices them ({calibration} "
             f"models; predicted, not measured), beside the pad-batch baseline: the parts that "
             f"shrink are why the tuned config wins.", "",
             f"| part | {head} |", "|---|" + "---:|" * len(data["configs"])]
    for k, values in data["parts"].items():
        lines.append(f"| {k} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines.append("| **step (predicted)** | "
                 + " | ".join(f"{v:.3f}" for v in data["step_predicted_s"]) + " |")
    lines.append("| step (measured) | " + " | ".join(
        f"{v:.3f}" if v else "-" for v in data["step_measured_s"]) + " |")
    return "\n".join(lines) + "\n"


def predicted_vs_measured(trials: list[Trial], calibration: str) -> str:
    lines = ["## Predicted against measured", "",
             f"Predictions made before each candidate was measured ({calibration} models, "
             f"recalibrated on the measurements of earlier rounds). Both at the machine's "
             f"reference speed: a measurement is scaled by the canary matmul timed around it, "
             f"as the models were fitted.", "",
             "| # | config | predicted tokens/s | measured tokens/s | measured / predicted |",
             "|---|---|---:|---:|---:|"]
    for t in trials:
        pred = t.predicted_tokens_per_s
        meas = t.measurement.tokens_per_s * t.measurement.drift if t.measurement.tokens_per_s else None
        ratio = f"{meas / pred:.2f}" if pred and meas else "-"
        lines.append(f"| {t.n} | `{t.rc.label()}` | {pred:,.0f} | " if pred else
                     f"| {t.n} | `{t.rc.label()}` | - | ")
        lines[-1] += f"{meas:,.0f} | {ratio} |" if meas else f"{t.measurement.status.value} | - |"
    return "\n".join(lines) + "\n"


def front_section(ok: list[Trial]) -> str:
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
