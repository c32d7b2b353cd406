"""Family tuning against exhaustive search, on this CPU.

    python -m suites.kernel_tuning [--kernel matmul] [--shapes 12] [--budget 0.25]
                                   [--seeds 10] [--out results/kernel_tuning]

The shapes are the kernel's shapes in the default workload's steps (every baseline
schedule), one per shape bucket, spread from the smallest to the largest. Every (shape,
config) pair is timed once (``autotune.kernel_tune.bench``: a warm-up, then the median of at
least 5 calls and 20 ms) into ``exhaustive.parquet``; family tuning and per-shape independent
tuning then replay that table (Kernel Tuner's simulation mode), so both are judged on the
same measurements. Independent tuning draws random configs, so it runs over ``--seeds``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.kernel_tune import bench, family_tune, independent_tune, workload_shapes
from profilers.progress import progress


def _shapes(kernel: str, n: int) -> list[dict]:
    from autotune.config import Workload
    from autotune.portfolio import baseline_configs
    from kernels.cache import shape_bucket

    by_bucket: dict[str, dict] = {}
    for rc in baseline_configs(Workload()):
        for shape in workload_shapes(rc)[kernel]:
            by_bucket.setdefault(shape_bucket(shape), shape)
    found = sorted(by_bucket.values(), key=lambda s: float(np.prod(list(s.values()))))
    if len(found) <= n:
        return found
    return [found[int(round(i))] for i in np.linspace(0, len(found) - 1, n)]


def main(argv: list[str] | None = None) -> int:
    import torch

    from kernels.registry import KERNELS
    from suites._report import host_line

    p = argparse.ArgumentParser(prog="python -m suites.kernel_tuning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default="matmul", choices=sorted(KERNELS))
    p.add_argument("--shapes", type=int, default=12)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--out", default="results/kernel_tuning")
    args = p.parse_args(argv)
    spec = KERNELS[args.kernel]
    shapes = _shapes(args.kernel, args.shapes)
    cfgs = spec.configs()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / f"{args.kernel}_exhaustive.parquet"
    if table_path.exists():
        table = pd.read_parquet(table_path)
    else:
        rows = []
        for s, shape in enumerate(progress(shapes, desc="shapes", unit="shape")):
            inputs = spec.make(shape, torch.float32, torch.Generator().manual_seed(s))
            for c, cfg in enumerate(cfgs):
                rows.append({"shape": s, "config": c, "shape_json": json.dumps(shape),
                             "config_json": json.dumps(cfg),
                             "seconds": bench(lambda: spec.run(inputs, cfg))})  # noqa: B023
        table = pd.DataFrame(rows)
        table.to_parquet(table_path, index=False)
    t = table.pivot(index="shape", columns="config", values="seconds").to_numpy()
    best = t.min(axis=1)
    fam = family_tune(shapes, cfgs, lambda s, c: float(t[s, c]), features=spec.features,
                      budget=args.budget)
    fam_ratio = best / t[np.arange(len(shapes)), fam.best]
    per_shape = fam.n_measured // len(shapes)
    ind = []
    for seed in range(args.seeds):
        r = independent_tune(shapes, cfgs, lambda s, c: float(t[s, c]), per_shape=per_shape, seed=seed)
        ind.append(best / t[np.arange(len(shapes)), r.best])
    ind = np.array(ind)  # seeds x shapes
    worst = t.max(axis=1)
    default = next(i for i, c in enumerate(cfgs) if c == {"block_m": 128, "block_n": 128, "block_k": 128}) \
        if args.kernel == "matmul" else None
    lines = [f"# Family tuning of `{args.kernel}` against exhaustive search (CPU)", "",
             f"Host: {host_line()}. CPU figures, not GPU figures. Reproduce: "
             f"`python -m suites.kernel_tuning --kernel {args.kernel} --shapes {args.shapes}`.", "",
             f"- {len(shapes)} shapes of the default workload's steps x {len(cfgs)} configs of "
             f"`kernels.{args.kernel.replace('linear_ce', 'linear_ce')}` CPU_SPACE = {t.size} pairs, "
             f"each timed once (median of >= 5 calls and >= 20 ms after a warm-up), float32.",
             f"- Family tuning measured **{fam.n_measured} pairs = {fam.n_measured / t.size:.1%}** "
             f"(budget {args.budget:.0%}); independent per-shape tuning got the same "
             f"{per_shape} configs per shape ({per_shape * len(shapes)} pairs), random, "
             f"{args.seeds} seeds.",
             f"- Within 5% of the exhaustive best on every shape: family "
             f"**{'yes' if (fam_ratio >= 0.95).all() else 'no'}** (worst "
             f"{fam_ratio.min():.1%}); independent: {int(((ind >= 0.95).all(axis=1)).sum())} of "
             f"{args.seeds} seeds (median worst shape {np.median(ind.min(axis=1)):.1%}).",
             f"- The spread that tuning is about: slowest / fastest config per shape "
             f"{np.median(worst / best):.1f}x median ({(worst / best).min():.1f}-"
             f"{(worst / best).max():.1f}x).", "",
             "| shape | exhaustive best config | best ms | family: best / picked | "
             "independent: best / picked (median over seeds; min) |"
             + (" default 128^3: best / it |" if default is not None else ""),
             "|---|---|---:|---:|---:|" + ("---:|" if default is not None else "")]
    for s, shape in enumerate(shapes):
        row = (f"| {shape} | {cfgs[int(np.argmin(t[s]))]} | {best[s] * 1e3:.2f} | "
               f"{fam_ratio[s]:.1%} | {np.median(ind[:, s]):.1%}; {ind[:, s].min():.1%} |")
        if default is not None:
            row += f" {best[s] / t[s, default]:.1%} |"
        lines.append(row)
    lines += ["", f"Mean over shapes: family {fam_ratio.mean():.1%}, independent "
              f"{ind.mean():.1%} (seed-median of means {np.median(ind.mean(axis=1)):.1%}).", ""]
    (out / f"{args.kernel}.md").write_text("\n".join(lines))
    (out / f"{args.kernel}.json").write_text(json.dumps({
        "shapes": shapes, "measured_pairs": fam.n_measured, "pairs": int(t.size),
        "family_ratio": fam_ratio.tolist(), "independent_ratio": ind.tolist()}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
