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

from autotune.config import RunConfig, SearchSpace, Workload
from autotune.tune.study import config_key
from profilers.progress import progress

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
    for rc in progress(todo, desc="measuring", unit="config"):
        start, began = time.monotonic(), time.time()
        m = measure(rc, steps=args.steps, warmup=args.warmup, timeout_s=args.timeout)
        # when, so a window in which something else loaded the machine can be re-measured
        rows.append({**_row(rc, m), "wall_s": time.monotonic() - start, "started_at": began})
        _write(path, rows)
    frame = pd.DataFrame(rows)
    print(f"{(frame.status == 'COMPLETE').sum()} of {len(frame)} configs COMPLETE; "
          f"{frame.status.value_counts().to_dict()}; {frame.wall_s.sum() / 60:.0f} min measuring")
    return 0


def _table(out: Path) -> tuple[pd.DataFrame, list[RunConfig]]:
    """The sweep's measurements and the configs of the space it covers (a partial sweep:
    the measured part of the space, so every replayed answer is a real measurement)."""
    path = out / "exhaustive.parquet"
    if not path.exists():
        raise SystemExit(f"{path}: no sweep yet; run `python -m suites.tuner sweep` first")
    frame = pd.read_parquet(path)
    keys = {config_key(RunConfig.model_validate_json(j)) for j in frame.config_json}
    space = [rc for rc in acceptance_candidates() if config_key(rc) in keys]
    return frame, space


def baseline_bests(name: str, space: list[RunConfig], source, budget: int,  # noqa: ANN001
                   user: RunConfig, seeds: int):  # noqa: ANN201 - np.ndarray
    """The best tokens/s one baseline finds within ``budget`` measurements of ``source``,
    once per seed (once for the deterministic DeepSpeed-style search)."""
    import numpy as np

    from autotune.tune.sources import Recorded
    from autotune.tune.strategies import Context, drive, make

    found = []
    for seed in range(seeds if name != "deepspeed-style" else 1):
        strategy = make(name, Context(space, user=user, seed=seed, budget=budget))
        trials = drive(strategy, Recorded.measuring(source), budget=budget)
        found.append(max([float(t.measurement.tokens_per_s or 0) for t in trials if t.ok]
                         or [0.0]))
    return np.array(found)


def _cli_run(table: Path, space_yaml: Path, budget: int, models: str, out: Path,
             seed: int) -> dict:
    import contextlib
    import io
    import json

    from autotune.cli import main as cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli(["run", "--replay", str(table), "--space", str(space_yaml), "--nproc", "2",
                  "--budget-trials", str(budget), "--baselines", "--seed", str(seed),
                  "--models", models, "--out", str(out), "--json"])
    if rc != 0:
        raise SystemExit(f"autotune run exited {rc}: {buf.getvalue()[-2000:]}")
    return json.loads(buf.getvalue())


def _compare(args: argparse.Namespace) -> int:
    import json
    import shutil
    import tempfile

    import numpy as np

    from autotune.config import dump_yaml
    from autotune.portfolio import baseline_configs
    from autotune.tune.sources import ReplaySource
    from autotune.tune.strategies import BASELINES
    from suites._report import host_line

    out = Path(args.out)
    frame, space = _table(out)
    ok = frame[frame.status == "COMPLETE"]
    first = json.loads(ok.measurement_json.iloc[0])
    best = float(ok.tokens_per_s.max())
    best_label = ok.loc[ok.tokens_per_s.idxmax(), "label"]
    budget = max(2, int(args.budget * len(space)))
    table = out / "exhaustive.parquet"
    models = ["prior"] + ([args.models] if Path(args.models, "models.json").exists() else [])
    lines = ["# The tuner against an exhaustive sweep (CPU)", "",
             f"Host: {host_line()}. CPU figures, not GPU figures. Reproduce:", "",
             "    python -m suites.tuner sweep     # every config measured, about an hour",
             "    python -m suites.tuner compare   # the search and baselines replayed, seconds",
             "",
             f"- Space: `ACCEPTANCE_SPACE` in `suites/tuner.py` on the default workload with 2 "
             f"CPU ranks: {len(space)} valid configs measured ({len(ok)} COMPLETE, "
             f"{frame.status.value_counts().to_dict()}), each once by `autotune.measure` "
             f"({first['timed_steps']} timed steps after {first['warmup_steps']} warm-up, own "
             f"process tree), {frame.wall_s.sum() / 60:.0f} min in all.",
             f"- Exhaustive best: `{best_label}` at {best:,.0f} tokens/s. Configs within 10% of "
             f"it: {int((ok.tokens_per_s >= 0.9 * best).sum())} (two measurements of one config "
             f"on this host differ by about 12% median, `results/step_dataset_canary/`).",
             f"- Budget: {budget} measurements = {budget / len(space):.1%} of the space, for the "
             f"tuner (its pad-batch baseline included) and for each baseline.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        space_yaml = Path(tmp) / "space.yaml"
        space_yaml.write_text(dump_yaml(ACCEPTANCE_SPACE))
        runs = {}
        for m in models:
            runs[m] = _cli_run(table, space_yaml, budget, m, Path(tmp) / f"run-{m.replace('/', '_')}", 0)
        shown = models[-1]
        keep = out / "run"
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
        src = Path(tmp) / f"run-{shown.replace('/', '_')}"
        for name in ("report.md", "summary.json", "tuned.yaml", "space.yaml"):
            shutil.copy(src / name, keep / name)
    lines += ["## `autotune run --replay` on the sweep", "",
              "| models | tuned config | tokens/s | of exhaustive best | measurements |",
              "|---|---|---:|---:|---:|"]
    for m, r in runs.items():
        lines.append(f"| {m} | `{r['config']}` | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / best:.1%} | {r['measured_trials']} "
                     f"({r['measured_trials'] / len(space):.1%}) |")
    # The stochastic baselines over many seeds: one seed's luck is no comparison.
    source = ReplaySource([table])
    user = baseline_configs(space[0].workload)[0]
    lines += ["", f"## Baselines at the same budget ({budget} measurements), "
              f"{args.seeds} seeds each", "",
              "| strategy | best tokens/s (median over seeds) | min-max | of exhaustive best "
              "(median) | tuned / strategy (median; min-max) |",
              "|---|---:|---|---:|---|"]
    tuned = {m: r["tokens_per_s"] for m, r in runs.items()}
    for name in BASELINES:
        got = baseline_bests(name, space, source, budget, user, args.seeds)
        ratios = "; ".join(f"{m}: {tuned[m] / np.median(got):.2f}x "
                           f"({tuned[m] / got.max():.2f}-{tuned[m] / max(got.min(), 1e-9):.2f})"
                           for m in models)
        lines.append(f"| {name} | {np.median(got):,.0f} | {got.min():,.0f}-{got.max():,.0f} | "
                     f"{np.median(got) / best:.1%} | {ratios} |")
    lines += ["", "The DeepSpeed-style search is deterministic (one run). `run/` holds the "
              f"report of the `{shown}` run, baselines included (seed 0).", ""]
    (out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))
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
    c = sub.add_parser("compare", help="replay the tuner and the baselines over the sweep")
    c.add_argument("--out", default="results/tuner")
    c.add_argument("--seeds", type=int, default=10, help="seeds of the TPE and random baselines")
    c.add_argument("--budget", type=float, default=0.15, help="measurements, share of the space")
    c.add_argument("--models", default="models", help="fitted models compared with the prior")
    c.set_defaults(func=_compare)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
