"""Measured steps of many RunConfigs of the default workload: the ground truth the step
model is fitted to and judged on.

    python -m suites.step_dataset [--configs 48] [--two-rank 12] [--bf16 3] [--steps 3]
                                  [--out results/step_dataset]

Configs are drawn (seeded) from the built-in search space over the default workload, spread
over policies, chunk sizes, micro-batch sizes and checkpointing, with ``--two-rank`` of them
on two CPU ranks (every dp/tp/pp layout the space allows) and ``--bf16`` in bfloat16 (about
10x slower than float32 on CPUs without bf16 units, hence few). ``pad-max`` is left out: at
about a minute per step it would take the campaign's whole time. Each config is measured
once by ``autotune.measure`` in its own processes; every Measurement is stored in
``measurements.parquet`` (with the config as YAML), written after each trial, and configs
already there are skipped, so the campaign resumes where it stopped.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import RunConfig, SearchSpace, Workload
from autotune.measure import measure
from profilers.ops import case_key
from profilers.progress import progress
from profilers.store import atomic_write_bytes

_POLICIES = ["pad-batch", "sorted", "pack", "skrull", "chunkflow"]


def sample_configs(n_single: int, n_two: int, n_bf16: int, seed: int = 0) -> list[RunConfig]:
    """Configs spread over the policies (round-robin), drawn at random within each."""
    rng = np.random.default_rng(seed)
    space = SearchSpace(policy=_POLICIES, dtype=["fp32", "bf16"])
    out: list[RunConfig] = []
    for world, count in ((1, n_single), (2, n_two)):
        wl = Workload.model_validate({"hardware": {"devices_per_node": world}})
        by_policy: dict[str, list[RunConfig]] = {p: [] for p in _POLICIES}
        for rc in space.grid(wl):
            if rc.precision.dtype == "fp32":
                by_policy[rc.schedule.policy].append(rc)
        picked: list[RunConfig] = []
        while len(picked) < count:
            for policy in _POLICIES:
                pool = by_policy[policy]
                if pool and len(picked) < count:
                    picked.append(pool.pop(int(rng.integers(len(pool)))))
        out += picked
    singles = [rc for rc in out if rc.parallel.world_size == 1 and rc.schedule.policy != "pad-batch"]
    for i in rng.choice(len(singles), size=min(n_bf16, len(singles)), replace=False):
        out.append(singles[int(i)].model_copy(
            update={"precision": singles[int(i)].precision.model_copy(update={"dtype": "bf16"})}))
    return out


def _row(rc: RunConfig, m) -> dict:  # noqa: ANN001
    return {"config_key": _config_key(rc), "label": rc.label(),
            "policy": rc.schedule.policy, "dtype": rc.precision.dtype,
            "world": rc.parallel.world_size, "config_json": rc.model_dump_json(),
            "status": m.status.value, "tokens_per_s": m.tokens_per_s,
            "step_time_s": m.step_time_s, "step_time_iqr_s": m.step_time_iqr_s,
            "peak_mem_bytes": m.peak_mem_bytes, "peak_rss_bytes": m.peak_rss_bytes,
            "measurement_json": json.dumps(m.to_json_dict())}


def _write(path: Path, rows: list[dict]) -> None:
    data = io.BytesIO()
    pd.DataFrame(rows).to_parquet(data, index=False)
    atomic_write_bytes(path, data.getvalue())


def _repeat(out: Path, n: int, steps: int, warmup: int) -> int:
    table = pd.read_parquet(out / "measurements.parquet")
    pool = table[(table.status == "COMPLETE") & (table.world == 1) & (table.dtype == "fp32")]
    picked = pool.groupby("policy", sort=False).head((n + 4) // 5).head(n)
    rows = []
    for rec in progress(list(picked.itertuples()), desc="re-measuring", unit="config"):
        rc = RunConfig.model_validate_json(rec.config_json)
        rows.append(_row(rc, measure(rc, steps=steps, warmup=warmup, timeout_s=900)))
        _write(out / "repeat.parquet", rows)
    ratio = pd.Series([r["tokens_per_s"] for r in rows]) / picked.tokens_per_s.to_numpy()
    dev = (ratio - 1).abs()
    print(f"{len(ratio)} configs measured twice: |second / first - 1| of tokens/s median "
          f"{dev.median():.1%}, mean {dev.mean():.1%}, max {dev.max():.1%}; ratio range "
          f"{ratio.min():.3f}-{ratio.max():.3f}")
    return 0


def _config_key(rc: RunConfig) -> str:
    return case_key(json.loads(rc.model_dump_json()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.step_dataset", description=__doc__)
    p.add_argument("--configs", type=int, default=48, help="single-rank configs")
    p.add_argument("--two-rank", type=int, default=12)
    p.add_argument("--bf16", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per trial")
    p.add_argument("--out", default="results/step_dataset")
    p.add_argument("--repeat", type=int, default=0, metavar="N",
                   help="instead: measure N of the stored single-rank fp32 configs again "
                        "(one per policy in turn) into repeat.parquet, and print how far the "
                        "two measurements of each config lie apart (the noise floor any "
                        "predictor is judged against)")
    args = p.parse_args(argv)
    if args.repeat:
        return _repeat(Path(args.out), args.repeat, args.steps, args.warmup)
    out = Path(args.out) / "measurements.parquet"
    table = pd.read_parquet(out) if out.exists() else pd.DataFrame()
    # keys of the stored configs as the current schema reads them (a new optional field
    # changes the dump, not the config)
    done = {_config_key(RunConfig.model_validate_json(j)) for j in table.config_json} if len(table) else set()
    configs = sample_configs(args.configs, args.two_rank, args.bf16, args.seed)
    todo = [rc for rc in configs if _config_key(rc) not in done]
    rows = table.to_dict("records") if len(table) else []
    for rc in progress(todo, desc="measuring", unit="config"):
        rows.append(_row(rc, measure(rc, steps=args.steps, warmup=args.warmup,
                                     timeout_s=args.timeout)))
        _write(out, rows)
    frame = pd.DataFrame(rows)
    ok = frame[frame.status == "COMPLETE"]
    print(f"{len(ok)} of {len(frame)} configs measured COMPLETE; "
          f"{frame.status.value_counts().to_dict()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
