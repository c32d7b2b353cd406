"""``autotune predict RUNCONFIG``: the step model's prediction of a config, without running it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autotune.cli._common import load_runconfig, non_negative_int, positive_int, print_json
from autotune.errors import UserError

DEFAULT_MODELS = Path("models")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict a RunConfig's step time, throughput and memory")
    p.add_argument("runconfig", help="RunConfig YAML")
    p.add_argument("--models", help=f"fitted models from `autotune fit` (default {DEFAULT_MODELS}/ "
                                    f"when present, else the analytic prior on this machine's "
                                    f"measured ceilings)")
    p.add_argument("--warmup", type=non_negative_int, default=1,
                   help="global batches skipped before the priced ones (default 1)")
    p.add_argument("--steps", type=positive_int, default=3,
                   help="global batches priced and averaged (default 3)")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.set_defaults(func=run)


def load_models(folder: str | None, hardware):  # noqa: ANN001, ANN201 - HardwareSpec
    """Fitted models (refused, one line, when they belong to another machine), or the prior
    (``prior``: the analytic prior even where fitted models exist); for a GPU this machine
    lacks, the prior on the datasheet of ``hardware.device_name``."""
    from autotune.predict import default_models
    from cost_models.family import ModelMismatch

    device, name = hardware.device, hardware.device_name
    if folder == "prior":
        return default_models(None, device, device_name=name)

    if folder is None and (DEFAULT_MODELS / "models.json").exists():
        folder = str(DEFAULT_MODELS)
    if folder is not None and not Path(folder).is_dir():
        raise UserError(f"--models {folder}: no such folder; fit one with `autotune fit`")
    try:
        return default_models(folder, device, device_name=name)
    except ModelMismatch as exc:
        raise UserError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from autotune.predict import StepPredictor

    rc, _ = load_runconfig(args.runconfig, tokens=False)
    models = load_models(args.models, rc.workload.hardware)
    predictor = StepPredictor(models, warmup=args.warmup, steps=args.steps)
    pred = predictor.predict(rc)
    use = predictor.utilization(rc, pred.tokens_per_s)
    if args.json:
        print_json({"config": rc.label(), "predicted": True} | pred.to_json_dict() | use)
        return 0
    how = (f"calibrated by {pred.residual_measurements} measured steps" if pred.calibration == "measured"
           else "prior only: no measured step has calibrated it")
    print(f"{rc.label()} (predicted): {pred.tokens_per_s:,.0f} tokens/s "
          f"({use['tokens_per_s_per_device']:,.0f} per device x {use['world']}, MFU "
          f"{use['mfu']:.1%} of {models.ceilings.source}), step {pred.step_time_s:.3f} s, "
          f"peak memory {pred.peak_mem_bytes / 2**20:,.0f} MiB per rank ({how})")
    if pred.spread:
        print(f"  spread of the GPU prior's cited figures: {pred.spread['tokens_per_s_low']:,.0f} to "
              f"{pred.spread['tokens_per_s_high']:,.0f} tokens/s (step "
              f"{pred.spread['step_time_s_low']:.3f} to {pred.spread['step_time_s_high']:.3f} s)")
    total = sum(pred.breakdown.values())
    for part, seconds in pred.breakdown.items():
        if seconds:
            print(f"  {part:<12} {seconds:9.4f} s  {seconds / total:6.1%}")
    if pred.overlapped_s:
        print(f"  {'(overlapped)':<12} {pred.overlapped_s:9.4f} s  data-parallel communication "
              f"hidden behind compute")
    for part, source in pred.sources.items():
        print(f"  source {part}: {source}", file=sys.stderr)
    return 0
