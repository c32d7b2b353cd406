"""How fast the step model prices candidates: N RunConfigs of the default workload drawn
from the search space (1 and 2 ranks, every policy, dtype and checkpointing), predicted in
one batched call by a cold predictor (planning and every family model call included).

    python -m suites.predict_speed [--configs 10000] [--repeats 3] [--models DIR]
                                   [--out results/step_model]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import RunConfig, SearchSpace, Workload
from autotune.predict import StepPredictor, default_models
from profilers.store import atomic_write_text
from suites._report import host_line


def candidates(n: int, seed: int = 0) -> list[RunConfig]:
    """``n`` configs drawn with replacement from the 1- and 2-rank grids of the space."""
    space = SearchSpace(dtype=["fp32", "bf16"])
    pool: list[RunConfig] = []
    for world in (1, 2):
        pool += list(space.grid(Workload.model_validate({"hardware": {"devices_per_node": world}})))
    rng = np.random.default_rng(seed)
    return [pool[int(i)] for i in rng.integers(len(pool), size=n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.predict_speed", description=__doc__)
    p.add_argument("--configs", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", help="fitted models (default: the prior on measured ceilings)")
    p.add_argument("--out", default="results/step_model")
    args = p.parse_args(argv)
    models = default_models(args.models)
    rcs = candidates(args.configs)
    distinct = len({rc.model_dump_json() for rc in rcs})
    times = []
    for _ in range(args.repeats):
        predictor = StepPredictor(models)  # cold: no plan or prediction cached
        t0 = time.perf_counter()
        out = predictor.predict_many(rcs)
        times.append(time.perf_counter() - t0)
        assert len(out) == len(rcs) and np.isfinite(out.tokens_per_s).all()
    s = pd.Series(times)
    text = (f"# Batched prediction speed\n\n{host_line()}; {args.configs:,} candidate RunConfigs "
            f"({distinct:,} distinct) of the default workload, 1 and 2 ranks, models: "
            f"{args.models or 'prior on measured ceilings'} ({models.calibration}).\n\n"
            f"Cold predictor, one `predict_many` call, {args.repeats} repeats: median "
            f"{s.median():.2f} s (min {s.min():.2f}, max {s.max():.2f}); "
            f"{args.configs / s.median():,.0f} configs/s.\n")
    atomic_write_text(Path(args.out) / "predict_speed.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
