"""Scheduling benchmark: every policy side by side on one workload, in one run.

    python -m suites.scheduling [--repeats 3] [--steps 3] [--out results/scheduling]

Part 1 measures effective tokens/s (padding excluded) of each policy on the default
workload; every contender trains on the same global batches (same seed, same steps), runs
in its own process, and the contenders are interleaved round-robin so that machine noise
falls on all of them alike. Reported: median over repeats, min-max spread, and ratios.

Part 2 holds the tokens per step fixed and makes the longest sequence 2x and then 8x the
chunk size, and reports peak tensor memory of ChunkFlow and pad-batch on the heaviest step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import RunConfig, Workload
from autotune.data.sequences import longsft_lengths
from autotune.measure import measure
from profilers.progress import progress
from profilers.records import Status
from profilers.store import atomic_write_text
from suites._report import host_line, md_table

CHUNK = 512


def throughput_contenders(wl: Workload) -> dict[str, RunConfig]:
    def rc(**schedule: object) -> RunConfig:
        return RunConfig.model_validate({"workload": wl, "schedule": schedule})

    return {
        "pad-max": rc(policy="pad-max", micro_batch_size=8),
        "pad-batch": rc(policy="pad-batch", micro_batch_size=8),
        "sorted": rc(policy="sorted", micro_batch_size=8),
        "pack": rc(policy="pack", micro_batch_tokens=2048),
        "skrull": rc(policy="skrull", micro_batch_tokens=2048),
        "chunkflow": rc(policy="chunkflow", chunk_size=CHUNK, micro_batch_tokens=CHUNK,
                        chunkflow_k=1),
    }


def _measure_rows(jobs: list[tuple[str, dict, RunConfig]], *, steps: int, warmup: int,
                  timeout: float, desc: str) -> list[dict]:
    rows = []
    for name, tags, rc in progress(jobs, desc=desc, unit="trial"):
        m = measure(rc, steps=steps, warmup=warmup, timeout_s=timeout)
        rows.append({"contender": name, **tags, "status": m.status.value,
                     "tokens_per_s": m.tokens_per_s, "step_time_s": m.step_time_s,
                     "step_time_iqr_s": m.step_time_iqr_s, "peak_mem_bytes": m.peak_mem_bytes,
                     "peak_rss_bytes": m.peak_rss_bytes, "mfu": m.mfu,
                     "padding_fraction": m.extra.get("padding_fraction"),
                     "schedule_fraction": m.extra.get("schedule_fraction"),
                     "max_seq_len": m.extra.get("max_seq_len"),
                     "losses": json.dumps(m.extra.get("losses")), "reason": m.reason})
        if m.status is not Status.COMPLETE:
            print(f"{name}: {m.status.value}: {m.reason}", file=sys.stderr)
    return rows


def run_throughput(wl: Workload, *, repeats: int, pad_max_repeats: int, steps: int, warmup: int,
                   timeout: float) -> pd.DataFrame:
    contenders = throughput_contenders(wl)
    jobs = []
    for r in range(repeats):  # round-robin: noise lands on every contender alike
        for name, rc in contenders.items():
            if name == "pad-max" and r >= pad_max_repeats:
                continue
            jobs.append((name, {"repeat": r}, rc))
    return pd.DataFrame(_measure_rows(jobs, steps=steps, warmup=warmup, timeout=timeout,
                                      desc="throughput"))


def _long_tail_file(folder: Path, longest: int, seed: int = 0) -> Path:
    """Lengths: the longsft shape below the chunk size, plus 3% sequences of ``longest``."""
    rng = np.random.default_rng(seed)
    short = longsft_lengths(2000, CHUNK, rng)
    lengths = np.concatenate([short, np.full(60, longest)])
    path = folder / f"longest-{longest}.npy"
    np.save(path, rng.permutation(lengths))
    return path


def run_memory(wl: Workload, folder: Path, *, steps: int, warmup: int,
               timeout: float) -> pd.DataFrame:
    jobs = []
    for factor in (2, 8):
        data = _long_tail_file(folder, factor * CHUNK)
        w = wl.model_copy(update={"data": wl.data.model_copy(
            update={"preset": None, "path": str(data)})})
        for name, sched in (("chunkflow", dict(policy="chunkflow", chunk_size=CHUNK,
                                                micro_batch_tokens=CHUNK, chunkflow_k=1)),
                            ("pad-batch", dict(policy="pad-batch", micro_batch_size=8))):
            rc = RunConfig.model_validate({"workload": w, "schedule": sched})
            jobs.append((name, {"longest": factor * CHUNK}, rc))
    return pd.DataFrame(_measure_rows(jobs, steps=steps, warmup=warmup, timeout=timeout,
                                      desc="memory"))


def summarize_throughput(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[df.status == "COMPLETE"]
    g = ok.groupby("contender")["tokens_per_s"]
    table = pd.DataFrame({"runs": g.size(), "tokens_per_s_median": g.median(),
                          "min": g.min(), "max": g.max()})
    firsts = ok.groupby("contender").first()
    table["padding"] = firsts["padding_fraction"]
    table["peak_tensor_mib"] = firsts["peak_mem_bytes"] / 2**20
    table["mfu_median"] = ok.groupby("contender")["mfu"].median()
    table["schedule_fraction_max"] = ok.groupby("contender")["schedule_fraction"].max()
    for base in ("pad-batch", "pad-max"):
        if base in table.index:
            table[f"vs_{base}"] = table.tokens_per_s_median / table.loc[base, "tokens_per_s_median"]
    return table.sort_values("tokens_per_s_median", ascending=False)


def render(thr: pd.DataFrame, mem: pd.DataFrame, args: argparse.Namespace, cpu: str) -> str:
    table = summarize_throughput(thr)
    fmt = {"tokens_per_s_median": ",.0f", "min": ",.0f", "max": ",.0f", "padding": ".0%",
           "peak_tensor_mib": ",.0f", "mfu_median": ".1%", "schedule_fraction_max": ".2%",
           "vs_pad-batch": ".2f", "vs_pad-max": ".2f", "runs": "d"}
    best = table.loc[["pack", "chunkflow"], "tokens_per_s_median"].max()
    lines = [
        "# Scheduling policies side by side", "",
        f"CPU figures, measured on {cpu} with `python -m suites.scheduling --repeats "
        f"{args.repeats} --pad-max-repeats {args.pad_max_repeats} --steps {args.steps} "
        f"--warmup {args.warmup}`. Default workload: llama-tiny on the longsft preset, "
        f"8,192 real tokens per step, float32. Each contender trains on the same global "
        f"batches, in its own process; contenders interleaved round-robin.", "",
        "## Effective tokens/s (padding excluded)", "",
        md_table(table, fmt), "",
        f"- best of pack/chunkflow vs pad-batch: "
        f"{best / table.loc['pad-batch', 'tokens_per_s_median']:.2f}x (target >= 2.5x)",
        f"- best of pack/chunkflow vs pad-max: "
        f"{best / table.loc['pad-max', 'tokens_per_s_median']:.2f}x (target >= 5x)", "",
    ]
    ok = mem[mem.status == "COMPLETE"].set_index(["contender", "longest"])["peak_mem_bytes"]
    lines += ["## Peak tensor memory as the longest sequence grows (tokens per step fixed)", "",
              f"chunk_size {CHUNK}; longest sequence 2x and 8x the chunk size; peak of live "
              f"tensors (parameters, gradients, optimizer state and activations) on the "
              f"heaviest timed step.", "",
              "| contender | longest 1024: MiB | longest 4096: MiB | growth |", "|---|---:|---:|---:|"]
    for name in ("chunkflow", "pad-batch"):
        try:
            a, b = ok[(name, 2 * CHUNK)], ok[(name, 8 * CHUNK)]
            lines.append(f"| {name} | {a / 2**20:,.0f} | {b / 2**20:,.0f} | {b / a - 1:+.0%} |")
        except KeyError:
            lines.append(f"| {name} | - | - | did not complete |")
    lines += ["", "ChunkFlow target: growth under 25%; pad-batch grows roughly with the longest "
              "sequence.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.scheduling", description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pad-max-repeats", type=int, default=1,
                   help="pad-max runs tens of times slower; one repeat is enough to rank it")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", default="results/scheduling")
    p.add_argument("--render-only", action="store_true",
                   help="re-render README.md from the CSVs already in --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.render_only:
        thr, mem = pd.read_csv(out / "throughput.csv"), pd.read_csv(out / "memory.csv")
    else:
        wl = Workload()
        thr = run_throughput(wl, repeats=args.repeats, pad_max_repeats=args.pad_max_repeats,
                             steps=args.steps, warmup=args.warmup, timeout=args.timeout)
        with tempfile.TemporaryDirectory() as tmp:
            mem = run_memory(wl, Path(tmp), steps=2, warmup=1, timeout=args.timeout)
        out.mkdir(parents=True, exist_ok=True)
        # Raw rows first: a failure while rendering must not lose the measurements.
        atomic_write_text(out / "throughput.csv", thr.to_csv(index=False))
        atomic_write_text(out / "memory.csv", mem.to_csv(index=False))
    report = render(thr, mem, args, host_line())
    atomic_write_text(out / "README.md", report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
