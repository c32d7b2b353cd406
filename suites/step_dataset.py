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
from tqdm import tqdm

from autotune.config import RunConfig, SearchSpace, Workload
from autotune.measure import measure
from profilers.ops import case_key
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
    p.add_argument("--out", default="results/step_dataset")
    args = p.parse_args(argv)
    out = Path(args.out) / "measurements.parquet"
    table = pd.read_parquet(out) if out.exists() else pd.DataFrame()
    done = set(table.config_key) if len(table) else set()
    configs = sample_configs(args.configs, args.two_rank, args.bf16, args.seed)
    todo = [rc for rc in configs if _config_key(rc) not in done]
    rows = table.to_dict("records") if len(table) else []
    for rc in tqdm(todo, desc="measuring", unit="config", file=sys.stderr):
        m = measure(rc, steps=args.steps, warmup=args.warmup, timeout_s=900)
        rows.append({"config_key": _config_key(rc), "label": rc.label(),
                     "policy": rc.schedule.policy, "dtype": rc.precision.dtype,
                     "world": rc.parallel.world_size, "config_json": rc.model_dump_json(),
                     "status": m.status.value, "tokens_per_s": m.tokens_per_s,
                     "step_time_s": m.step_time_s, "step_time_iqr_s": m.step_time_iqr_s,
                     "peak_mem_bytes": m.peak_mem_bytes, "peak_rss_bytes": m.peak_rss_bytes,
                     "measurement_json": json.dumps(m.to_json_dict())})
        frame = pd.DataFrame(rows)
        data = io.BytesIO()
        frame.to_parquet(data, index=False)
        atomic_write_bytes(out, data.getvalue())
    frame = pd.DataFrame(rows)
    ok = frame[frame.status == "COMPLETE"]
    print(f"{len(ok)} of {len(frame)} configs measured COMPLETE; "
          f"{frame.status.value_counts().to_dict()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
