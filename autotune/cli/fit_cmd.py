"""``autotune fit --profiles DIR``: fit the cost models on a profile store (and on measured
steps), print their accuracy on held-out instances, save them for ``autotune predict``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autotune.cli._common import positive_int, print_json
from autotune.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit the cost models and report their held-out accuracy")
    p.add_argument("--profiles", required=True, help="profile store from `autotune profile`")
    p.add_argument("--measurements", action="append", default=[], metavar="PATH",
                   help="measured steps: a measurements .parquet (suites.step_dataset) or a "
                        "folder of `autotune measure --out` records; repeatable")
    p.add_argument("--collectives", help="profile store holding collective_fit.parquet "
                                         "(default: the --profiles store, when it has one)")
    p.add_argument("--out", default="models", help="models folder (default models/)")
    p.add_argument("--folds", type=positive_int, default=5,
                   help="folds of the step model's held-out evaluation (default 5)")
    p.add_argument("--json", action="store_true", help="print the accuracy tables as JSON")
    p.set_defaults(func=run)


def _collective_fits(folder: Path | None):  # noqa: ANN202
    import pandas as pd

    if folder is None:
        return None
    path = folder / "collective_fit.parquet"
    return pd.read_parquet(path) if path.exists() else None


def _complete_ceilings(store, dtypes: list[str], device: str) -> None:  # noqa: ANN001
    """A sweep stopped by its budget has op rows but not yet the device's ceilings, which it
    stores only on completing: measure them now if this machine is the one profiled (its
    figures describe no other), as the completed sweep would have."""
    from autotune import __version__
    from profilers.store import StoreError

    if not dtypes:
        raise UserError(f"--profiles {store.root} holds no completed op-family measurement to fit; "
                        f"run `autotune profile --out {store.root}` first (the same command "
                        f"resumes a stopped sweep)")
    try:
        added = store.record_ceilings(dtypes, device, package_version=__version__)
    except StoreError as exc:
        raise UserError(str(exc)) from None
    if added:
        print(f"the profile's sweep stopped before measuring the device's ceilings: measured "
              f"{', '.join(added)} on this machine into {store.root}", file=sys.stderr)


def _held_out(store) -> dict:  # noqa: ANN001 - ProfileStore
    """The family models and the kernel choice judged on held-out cases, printed."""
    from cost_models.fit import evaluate, kernel_choice

    fam = evaluate(store)
    print("op families, held-out cases (split by case, never by rows):")
    if len(fam):
        print(fam.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    else:  # a short or stopped profile: its few cases may all have fallen in training
        print("none held out yet: the profile has too few cases to judge the models on")
    choice = kernel_choice(store)
    if len(choice):
        print("\nkernel choice on held-out instances (top1: share where the pick is the fastest;"
              " top1_score: fastest time / picked time):")
        print(choice.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return {"families": fam.to_dict("records"), "kernel_choice": choice.to_dict("records")}


def run(args: argparse.Namespace) -> int:
    from autotune.calibrate import fit_calibration, load_measurements, step_accuracy
    from autotune.markdown import md_table
    from autotune.predict import complete_ceilings
    from cost_models.bundle import StepModels
    from cost_models.fit import fit_all, fit_rankers, profiled_dtypes
    from profilers.store import ProfileStore, StoreError, atomic_write_text

    try:
        store = ProfileStore.existing(Path(args.profiles))
    except StoreError as exc:
        raise UserError(str(exc)) from None
    if args.collectives and not Path(args.collectives, "collective_fit.parquet").exists():
        raise UserError(f"--collectives {args.collectives}: no collective_fit.parquet there; "
                        f"run `autotune profile --families collective --nproc N`")
    table = load_measurements(args.measurements) if args.measurements else None
    device = store.fingerprint.get("device_kind", "cpu")
    _complete_ceilings(store, profiled_dtypes(store), device)
    try:
        families, ceilings = fit_all(store)
    except ValueError as exc:
        raise UserError(f"--profiles {args.profiles}: {exc}") from None
    ceilings = complete_ceilings(ceilings, device)
    fits = _collective_fits(Path(args.collectives) if args.collectives else Path(args.profiles))
    models = StepModels(store.fingerprint_key, device, ceilings, families, fits,
                        rankers=fit_rankers(store))

    report = _held_out(store)
    if table is not None:
        prior = StepModels(store.fingerprint_key, device, ceilings, {}, fits)
        steps, per_config = step_accuracy(prior, models, table, args.folds)
        print(f"\nstep model on {len(table)} measured configs ({args.folds}-fold by config: each "
              f"predicted by a residual and memory model fitted without it):")
        print(steps.to_string(float_format=lambda v: f"{v:.3f}"))
        report["step"] = steps.reset_index().to_dict("records")
        models = fit_calibration(models, table)
        out = Path(args.out)
        atomic_write_text(out / "step_eval.csv", per_config.to_csv())
        atomic_write_text(out / "step_accuracy.md",
                          md_table(steps, {c: ".3f" for c in steps.columns if c != "n"}) + "\n")
    out = Path(args.out)
    models.save(out)
    atomic_write_text(out / "accuracy.json", json.dumps(report, indent=2, default=float) + "\n")
    if args.json:
        print_json(report)
    print(f"\nmodels saved to {out}/ ({models.calibration}; "
          f"{models.residual.n_measurements} measured steps); use `autotune predict RUNCONFIG "
          f"--models {out}`")
    return 0
