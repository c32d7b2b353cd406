"""report.md of a run: the tuned config, every measured candidate, and why the winner won;
and the markdown tables every report shares (pandas' own to_markdown needs an extra package)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from autotune.config import RunConfig, dump_yaml
from autotune.data import Dataset, Lengths
from profilers.records import Measurement, Status

__all__ = ["md_table", "render_report", "trial_table"]


def md_table(df: pd.DataFrame, floatfmt: dict[str, str] | None = None) -> str:
    """``df`` as a markdown table, index first; ``floatfmt`` maps a column to a format spec."""
    floatfmt = floatfmt or {}
    cols = list(df.columns)
    lines = ["| " + " | ".join([df.index.name or ""] + cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for idx in df.index:
        cells = [str(idx)] + [format(df.at[idx, c], floatfmt.get(c, ""))
                              if pd.notna(df.at[idx, c]) else "-" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: float | None, spec: str) -> str:
    """A figure a recorded measurement may lack (replayed tables keep what they kept)."""
    return "-" if v is None else format(v, spec)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def trial_table(trials: list[tuple[int, RunConfig, Measurement]],
                baseline: float | None) -> list[str]:
    rows = ["| # | config | status | tokens/s | vs pad-batch | step s (median, IQR) | "
            "peak tensor MiB | peak RSS MiB | MFU | padding |",
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    order = sorted(trials, key=lambda t: -(t[2].tokens_per_s or -1))
    for n, rc, m in order:
        if m.status is Status.COMPLETE:
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


def _why(best: tuple[int, RunConfig, Measurement],
         base: tuple[int, RunConfig, Measurement] | None) -> list[str]:
    _, rc, m = best
    lines = [f"`{rc.label()}` processed the most real tokens per second of every candidate "
             f"that completed within the memory cap."]
    if base is not None and base[2].status is Status.COMPLETE:
        bm = base[2]
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


def render_report(*, workload_rc: RunConfig, dataset: Dataset | Lengths,
                  trials: list[tuple[int, RunConfig, Measurement]],
                  best: tuple[int, RunConfig, Measurement] | None) -> str:
    dims = workload_rc.workload.model.resolve()
    wl = workload_rc.workload
    lengths = dataset.lengths
    base = next((t for t in trials if t[1].schedule.policy == "pad-batch"), None)
    base_tps = base[2].tokens_per_s if base and base[2].status is Status.COMPLETE else None
    fp = next((m.fingerprint for _, _, m in trials if m.fingerprint), None)
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
        n, rc, m = best
        out += ["## Tuned config", "",
                f"Trial {n}, `{rc.label()}`: **{m.tokens_per_s:,.0f} tokens/s** (effective, "
                f"padding excluded), median step {_fmt(m.step_time_s, '.3f')} s over "
                f"{m.timed_steps} timed steps, MFU {_fmt(m.mfu, '.1%')} of the measured matmul "
                f"ceiling.", "",
                "```yaml", dump_yaml(rc).rstrip(), "```", "",
                "## Why this config", "", *_why(best, base), ""]
    out += ["## Measured candidates", "", *trial_table(trials, base_tps), ""]
    return "\n".join(out)
