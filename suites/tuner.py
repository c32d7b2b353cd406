"""The tuner against the truth: every config of a space measured, then the search and its
baselines replayed over that table at equal measurement budgets.

    python -m suites.tuner sweep   [--out results/tuner] [--steps 3] [--timeout 180]
    python -m suites.tuner compare [--out results/tuner] [--seeds 10] [--budget 15%]

``sweep`` measures every valid config of ``ACCEPTANCE_SPACE`` on the default workload with
two CPU ranks (in a seeded shuffled order, so a partial table covers the whole space evenly)
with ``autotune.measure``, one isolated process tree per config, and stores each Measurement
in ``exhaustive.parquet`` as soon as it is taken; configs already there are skipped, so the
sweep resumes where it stopped. ``compare`` is the slow benchmark's fast half: it replays
``autotune run``'s guided search and the baselines over that table (Kernel Tuner's simulation
mode) and writes ``README.md`` with the ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from autotune.config import RunConfig, SearchSpace, Workload
from autotune.search import config_key

# The tuner's knobs at a size one CPU host measures exhaustively in about an hour: 132
# valid two-rank configs of the default workload. Left out for their cost here, not their
# interest: pad-max (about a minute a step) and pipeline parallelism (a pp2 step of
# sorted_mbs4 takes 31 s on this host against about 4 s data parallel).
ACCEPTANCE_SPACE = SearchSpace(
    policy=["pad-batch", "sorted", "pack", "skrull", "chunkflow"],
    micro_batch_size=[2, 4, 8], micro_batch_tokens=[1024, 2048, 4096],
    chunk_size=[1024], chunkflow_k=[1, 2], zero_stage=[0, 2, 3],
    checkpointing=["none", "full"], pp=[1])


def acceptance_candidates(nproc: int = 2) -> list[RunConfig]:
    wl = Workload.model_validate({"hardware": {"devices_per_node": nproc}})
    return list(ACCEPTANCE_SPACE.grid(wl))


def _sweep(args: argparse.Namespace) -> int:
    import numpy as np

    from autotune.measure import measure
    from suites.step_dataset import _row, _write

    path = Path(args.out) / "exhaustive.parquet"
    table = pd.read_parquet(path) if path.exists() else pd.DataFrame()
    rows = table.to_dict("records") if len(table) else []
    done = {config_key(RunConfig.model_validate_json(r["config_json"])) for r in rows}
    candidates = acceptance_candidates(args.nproc)
    order = np.random.default_rng(args.seed).permutation(len(candidates))
    todo = [candidates[i] for i in order if config_key(candidates[i]) not in done]
    print(f"{len(candidates)} configs in the space, {len(candidates) - len(todo)} already "
          f"measured", file=sys.stderr)
    for rc in tqdm(todo, desc="measuring", unit="config", file=sys.stderr):
        start = time.monotonic()
        m = measure(rc, steps=args.steps, warmup=args.warmup, timeout_s=args.timeout)
        rows.append({**_row(rc, m), "wall_s": time.monotonic() - start})
        _write(path, rows)
    frame = pd.DataFrame(rows)
    print(f"{(frame.status == 'COMPLETE').sum()} of {len(frame)} configs COMPLETE; "
          f"{frame.status.value_counts().to_dict()}; {frame.wall_s.sum() / 60:.0f} min measuring")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.tuner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="measure every config of the space (resumable)")
    s.add_argument("--out", default="results/tuner")
    s.add_argument("--nproc", type=int, default=2)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--timeout", type=float, default=180.0, help="seconds per config")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_sweep)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
