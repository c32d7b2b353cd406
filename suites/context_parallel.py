"""Context parallelism on 2 CPU ranks: Skrull's per-sequence placement (DACP) against
sharding every sequence and against data parallelism alone, in one run.

    python -m suites.context_parallel [--repeats 3] [--steps 3] [--out results/context_parallel]

Part 1, throughput: a long-tail workload whose longest sequence is 16x the median, trained
by dp=2 (pack, each rank's micro-batch holding the longest sequence whole), cp=2 with every
sequence sharded, and cp=2 under DACP; every contender trains the same global batches in its
own process, interleaved round-robin so that machine noise falls on all alike. Reported:
effective tokens/s (median over repeats, spread) and ratios, and how long the placement
itself takes against a step.

Under cp, one rank's budget (2,048 tokens) is below the longest sequence, which must be
sharded: the case context parallelism is for. dp=2 holds it whole in 4,096-token
micro-batches.

Part 2, memory: one sequence of the longest length per step, on cp=2 (sharded: each rank
holds half) and on dp=2 (one rank holds it whole); activation memory is the peak tensor
memory of that step less the peak of a step of a 64-token sequence (parameters, gradients,
optimizer state and buffers alike in both).

Part 3, what sharding costs: cp=2 with every sequence sharded against none sharded, on
fixed lengths of 256 and 2,048 tokens (no imbalance to win back), fitted as a + b L per
sequence in units of a token's step time under none: the CPU figures
``autotune.data.context_parallel.CPU_SHARD_COST`` holds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import RunConfig
from profilers.store import atomic_write_text
from suites._report import host_line, md_table
from suites.scheduling import _measure_rows

MODEL = {"preset": "llama-tiny"}
STEP_TOKENS = 32768  # real tokens in a global batch
RANK_TOKENS = 2048  # one rank's micro-batch budget under cp (a cp micro-batch holds twice)


def long_tail(folder: Path, n: int = 1200, seed: int = 0) -> tuple[Path, int, int]:
    """Log-normal lengths around a median of 256 tokens (16 to 2K), and 2% of sequences 16x
    the median long."""
    rng = np.random.default_rng(seed)
    short = np.clip(np.rint(rng.lognormal(np.log(256), 0.8, n)), 16, 2048).astype(np.int64)
    median = int(np.median(short))
    lengths = np.concatenate([short, np.full(n // 50, 16 * median)])
    path = folder / "long_tail.npy"
    np.save(path, rng.permutation(lengths).astype(np.int64))
    return path, int(np.median(lengths)), 16 * median


def _rc(data: Path, parallel: dict, *, tokens: int = STEP_TOKENS, **schedule: object
        ) -> RunConfig:
    """llama-tiny packed on 2 CPU ranks, ``tokens`` real tokens a step of the lengths in
    ``data``."""
    return RunConfig.model_validate({
        "workload": {"model": MODEL, "data": {"path": str(data)},
                     "hardware": {"devices_per_node": 2},
                     "budget": {"global_batch_tokens": tokens}},
        "schedule": {"policy": "pack", **schedule}, "parallel": parallel})


def _fixed(folder: Path, length: int, n: int) -> Path:
    path = folder / f"fixed-{length}x{n}.npy"
    np.save(path, np.full(n, length, dtype=np.int64))
    return path


def contenders(data: Path, longest: int) -> dict[str, RunConfig]:
    def rc(parallel: dict, **schedule: object) -> RunConfig:
        return _rc(data, parallel, **schedule)

    return {
        "dp2": rc({"dp": 2}, micro_batch_tokens=max(2 * RANK_TOKENS, longest)),  # longest whole
        "cp2-all": rc({"cp": 2}, micro_batch_tokens=RANK_TOKENS, cp_placement="all"),
        "cp2-dacp": rc({"cp": 2}, micro_batch_tokens=RANK_TOKENS, cp_placement="dacp"),
    }


def placement_seconds(rc: RunConfig, steps: int = 20) -> float:
    """Median seconds the placement of one global batch's micro-batches takes."""
    from itertools import islice

    from autotune.data import load_lengths, step_plans
    from autotune.data.context_parallel import Placer

    dims = rc.workload.model.resolve()
    placer = Placer.of(rc, dims)
    lengths = load_lengths(rc.workload.data, dims).lengths
    times = []
    for batch in islice(step_plans(rc, lengths, dims), steps):
        t0 = time.perf_counter()
        for plan in batch.ranks:
            for mb in plan.micro_batches():
                placer(mb)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_memory(folder: Path, longest: int, *, timeout: float) -> pd.DataFrame:
    jobs = []
    for length in (64, longest):
        path = _fixed(folder, length, 8)
        for name, parallel, schedule in (
                ("dp2", {"dp": 2}, {"micro_batch_tokens": longest}),
                ("cp2", {"cp": 2}, {"micro_batch_tokens": longest // 2, "cp_placement": "all"})):
            jobs.append((name, {"length": length}, _rc(path, parallel, tokens=length, **schedule)))
    return pd.DataFrame(_measure_rows(jobs, steps=1, warmup=0, timeout=timeout, desc="memory"))


def run_shard_cost(folder: Path, *, repeats: int, steps: int, warmup: int,
                   timeout: float) -> pd.DataFrame:
    rcs = {(length, placement): _rc(_fixed(folder, length, 400), {"cp": 2},
                                    micro_batch_tokens=4096, cp_placement=placement)
           for length in (256, 2048) for placement in ("all", "none")}
    jobs = [(f"{placement}-{length}", {"length": length, "placement": placement, "repeat": r}, rc)
            for r in range(repeats) for (length, placement), rc in rcs.items()]
    return pd.DataFrame(_measure_rows(jobs, steps=steps, warmup=warmup, timeout=timeout,
                                      desc="shard cost"))


def fit_shard_cost(frame: pd.DataFrame) -> tuple[float, float]:
    """(b, a): what sharding adds per token and per sequence, in tokens' step time under none."""
    ok = frame[frame.status == "COMPLETE"]
    step = ok.groupby(["length", "placement"]).step_time_s.median()
    per_seq = {}
    for length in (256, 2048):
        seqs = STEP_TOKENS / length
        token_s = step[(length, "none")] / STEP_TOKENS
        per_seq[length] = (step[(length, "all")] - step[(length, "none")]) / seqs / token_s
    b = (per_seq[2048] - per_seq[256]) / (2048 - 256)
    return b, per_seq[256] - 256 * b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.context_parallel", description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", default="results/context_parallel")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data, median, longest = long_tail(Path(tmp))
        rcs = contenders(data, longest)
        jobs = [(name, {"repeat": r}, rc) for r in range(args.repeats) for name, rc in rcs.items()]
        thr = pd.DataFrame(_measure_rows(jobs, steps=args.steps, warmup=args.warmup,
                                         timeout=args.timeout, desc="throughput"))
        place_s = {name: placement_seconds(rc) for name, rc in rcs.items() if rc.parallel.cp > 1}
        mem = run_memory(Path(tmp), longest, timeout=args.timeout)
        cost = run_shard_cost(Path(tmp), repeats=args.repeats, steps=args.steps,
                              warmup=args.warmup, timeout=args.timeout)
    thr.to_csv(out / "throughput.csv", index=False)
    mem.to_csv(out / "memory.csv", index=False)
    cost.to_csv(out / "shard_cost.csv", index=False)
    per_token, per_seq = fit_shard_cost(cost)
    cost_table = cost[cost.status == "COMPLETE"].groupby("contender").step_time_s.agg(
        ["size", "median", "min", "max"]).rename(columns={"size": "runs"})
    ok = thr[thr.status == "COMPLETE"]
    g = ok.groupby("contender").tokens_per_s
    table = pd.DataFrame({"runs": g.size(), "tokens_per_s": g.median(), "min": g.min(),
                          "max": g.max(), "step_s": ok.groupby("contender").step_time_s.median()})
    table["vs_cp2-all"] = table.tokens_per_s / table.loc["cp2-all", "tokens_per_s"]
    table["vs_dp2"] = table.tokens_per_s / table.loc["dp2", "tokens_per_s"]
    table["placement_share_of_step"] = [place_s.get(n, np.nan) / table.loc[n, "step_s"]
                                        for n in table.index]
    m = mem[mem.status == "COMPLETE"].set_index(["contender", "length"]).peak_mem_bytes
    act = {n: m[(n, longest)] - m[(n, 64)] for n in ("dp2", "cp2")}
    ratio = act["cp2"] / act["dp2"]
    fmt = {"tokens_per_s": ",.0f", "min": ",.0f", "max": ",.0f", "step_s": ".3f",
           "vs_cp2-all": ".2f", "vs_dp2": ".2f", "placement_share_of_step": ".3%", "runs": "d"}
    lines = [
        "# Context parallelism: DACP against all-sharded and data parallelism", "",
        f"CPU figures ({host_line()}), 2 ranks (gloo), measured with `python -m "
        f"suites.context_parallel --repeats {args.repeats} --steps {args.steps} --warmup "
        f"{args.warmup}`. llama-tiny, float32, {STEP_TOKENS:,} real tokens per step; lengths "
        f"log-normal (median {median} tokens, 16 to 2K) and 2% of sequences {longest} tokens long (16x "
        f"the median). dp=2 packs micro-batches of up to {2 * RANK_TOKENS:,} tokens per rank; "
        f"cp=2 micro-batches of up to {2 * RANK_TOKENS:,} over the pair ({RANK_TOKENS:,} per "
        f"rank). Contenders interleaved round-robin.", "",
        "## Effective tokens/s", "",
        md_table(table, fmt), "",
        f"- DACP against all-sharded: {table.loc['cp2-dacp', 'vs_cp2-all']:.2f}x (target >= 1.2x)",
        f"- DACP against dp=2: {table.loc['cp2-dacp', 'vs_dp2']:.2f}x",
        "- placement_share_of_step: the median time the placement of a global batch's "
        "micro-batches takes, over the median step (target under 1%)", "",
        "## Activation memory of the longest sequence", "",
        f"One {longest}-token sequence per step; peak tensor memory less that of a 64-token "
        f"step: dp=2 (one rank holds it whole) {act['dp2'] / 2**20:,.1f} MiB, cp=2 (each rank "
        f"half of it) {act['cp2'] / 2**20:,.1f} MiB: **{ratio:.0%}** of cp=1's (target at most "
        f"60%).", "",
        "## What sharding costs", "",
        "cp=2, every sequence sharded against none, on fixed lengths (step seconds):", "",
        md_table(cost_table, {"runs": "d", "median": ".3f", "min": ".3f", "max": ".3f"}), "",
        f"Per sharded sequence of L tokens, a + b L tokens' step time (under none): b = "
        f"{per_token:.2f}, a = {per_seq:.0f} (the placement's CPU figures, "
        f"`CPU_SHARD_COST`, are (0.27, 44), from this part's first run).", "",
    ]
    atomic_write_text(out / "README.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
