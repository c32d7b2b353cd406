"""How well the step model predicts measured steps: every config of ``suites.step_dataset``,
predicted by models that never saw it, against what ``autotune measure`` saw.

    python -m suites.step_model_eval --profiles profiles
        [--dataset results/step_dataset/measurements.parquet] [--collectives results/collectives]
        [--folds 5] [--out results/step_model]

The per-family models are fitted on the profile store (op measurements, no step ever seen);
the step residual and the memory model are fitted on measured steps, k-fold by config, so
each config is predicted by a residual fitted on the other folds. Four variants side by side:
the composition under the prior alone or the per-family models, with and without the
residual; and the per-family / global / prior ablation on held-out profile cases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.calibrate import load_measurements, score, step_accuracy
from autotune.config import RunConfig
from autotune.predict import complete_ceilings
from cost_models.bundle import StepModels
from cost_models.fit import evaluate, fit_all, kernel_choice
from profilers.records import Measurement
from profilers.store import ProfileStore, atomic_write_text
from suites._report import host_line, md_table


def _noise(paths: list[str]) -> str:
    """How far two measurements of one config lie apart: the floor under any MAPE."""
    frames = [pd.read_parquet(p) for p in paths]
    raw = pd.concat(frames, ignore_index=True)
    raw = raw[raw.status == "COMPLETE"]
    raw["key"] = [RunConfig.model_validate_json(j).model_dump_json() for j in raw.config_json]
    measurements = [Measurement.model_validate_json(j) for j in raw.measurement_json]
    raw["drift"] = [m.drift if m.canary_s else np.nan for m in measurements]
    raw["scaled"] = raw.tokens_per_s * raw.drift
    lines = []
    for col, what in (("tokens_per_s", "as measured"), ("scaled", "at reference speed (canary)")):
        pairs = raw.dropna(subset=[col]).groupby("key")[col].agg(["first", "last", "size"])
        pairs = pairs[pairs["size"] > 1]
        if pairs.empty:
            continue
        dev = (pairs["last"] / pairs["first"] - 1).abs()
        lines.append(f"- {what}: {len(pairs)} configs measured twice differ by "
                     f"{dev.median():.1%} median, {dev.mean():.1%} mean, {dev.max():.1%} at most")
    if not lines:
        return "No config was measured twice: run `python -m suites.step_dataset --repeat 10`."
    return ("Configs measured twice, minutes apart (`python -m suites.step_dataset --repeat 10`), "
            "tokens/s:\n\n" + "\n".join(lines) + "\n\nA predictor's MAPE against single "
            "measurements cannot fall far below this; configs measured twice are averaged below.")


def _ablation_table(ablation: pd.DataFrame) -> pd.DataFrame:
    """One row per family: held-out MAPE of each model side by side."""
    mape = ablation.pivot(index="family", columns="model", values="mape")
    tau = ablation.pivot(index="family", columns="model", values="kendall_tau")
    sizes = ablation.groupby("family")[["train", "test"]].first()
    out = sizes.assign(**{f"{m} MAPE": mape[m] for m in ("per-family", "global", "prior")})
    out["per-family tau"] = tau["per-family"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.step_model_eval", description=__doc__)
    p.add_argument("--profiles", required=True, help="a profile store of this machine")
    p.add_argument("--dataset", nargs="+", default=["results/step_dataset_canary/measurements.parquet",
                                                    "results/step_dataset_canary/repeat.parquet"],
                   help="measurement tables; a config measured twice counts once, averaged")
    p.add_argument("--collectives", default="results/collectives")
    p.add_argument("--no-drift-scaling", action="store_true",
                   help="judge against steps as measured, not scaled by the canary")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", default="results/step_model")
    args = p.parse_args(argv)
    store = ProfileStore.existing(args.profiles)
    table = load_measurements([d for d in args.dataset if Path(d).exists()],
                              scale_drift=not args.no_drift_scaling)
    families, ceilings = fit_all(store)
    device = store.fingerprint.get("device_kind", "cpu")
    ceilings = complete_ceilings(ceilings, device)
    fits_path = Path(args.collectives) / "collective_fit.parquet"
    fits = pd.read_parquet(fits_path) if fits_path.exists() else None
    prior = StepModels(store.fingerprint_key, device, ceilings, {}, fits)
    fitted = StepModels(store.fingerprint_key, device, ceilings, families, fits)
    summary, per_config = step_accuracy(prior, fitted, table, args.folds)

    # the best variant, split by what the acceptance asks it to span
    slices = []
    best = per_config
    for name, mask in (("1 rank", best.world == 1), ("2 ranks", best.world == 2),
                       ("fp32", best.bf16 == 0), ("bf16", best.bf16 == 1),
                       ("all", best.world > 0)):
        sub = best[mask]
        if len(sub):
            slices.append({"slice": name} | score(sub.predicted_tokens_per_s.to_numpy(),
                                                  sub.measured_tokens_per_s.to_numpy())
                          | {"peak_mem_mape": score(sub.predicted_peak_mem_bytes.to_numpy(),
                                                    sub.measured_peak_mem_bytes.to_numpy())["mape"]})
    slices = pd.DataFrame(slices).set_index("slice")
    noise = _noise([d for d in args.dataset if Path(d).exists()])
    ablation = evaluate(store)
    choice = kernel_choice(store)

    out = Path(args.out)
    fmt = {c: ".3f" for c in ("mape", "kendall_tau", "top1", "top5", "peak_mem_mape")}
    text = (f"# Step model accuracy\n\n{host_line()}; CPU measurements, never GPU figures.\n\n"
            f"{len(table)} RunConfigs of the default workload measured with `autotune measure` "
            f"(`python -m suites.step_dataset`), each predicted by a step residual and memory "
            f"model fitted on the other {args.folds - 1} of {args.folds} folds (split by "
            f"config); the per-family models are fitted on op profiles only.\n\n"
            f"## Measurement noise\n\n{noise}\n\n"
            f"## Tokens/s and peak memory, held out\n\n" + md_table(summary, fmt)
            + "\n\n## Per-family + step residual, by slice\n\n" + md_table(slices, fmt)
            + "\n\n## Op families, held-out profile cases (per-family vs global vs prior)\n\n"
            + md_table(_ablation_table(ablation), {c: ".3f" for c in ("per-family MAPE",
                                                                     "global MAPE", "prior MAPE",
                                                                     "per-family tau")})
            + "\n\n## Kernel choice (attention: sdpa or eager), held-out instances\n\n"
            + (md_table(choice.set_index("chooser"), {"top1": ".3f", "top1_score": ".3f"})
               if len(choice) else "No instance profiled under two kernels.")
            + "\n\nReproduce: `python -m suites.step_model_eval --profiles profiles` after "
              "`autotune profile --out profiles` and `python -m suites.step_dataset`.\n")
    atomic_write_text(out / "README.md", text)
    atomic_write_text(out / "eval.csv", per_config.to_csv())
    atomic_write_text(out / "family_ablation.csv", ablation.to_csv(index=False))
    atomic_write_text(out / "kernel_choice.csv", choice.to_csv(index=False))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
