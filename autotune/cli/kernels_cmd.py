"""``autotune kernels tune``: the kernel configs of a workload's shapes, tuned per family and
kept in the tuning cache the trainer reads at start-up."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from autotune.cli._common import load_workload, positive_float
from autotune.errors import UserError
from profilers.progress import progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="tune kernel configs for a workload's shapes")
    ks = p.add_subparsers(dest="kernels_command", required=True, parser_class=type(p))
    t = ks.add_parser("tune", help="family tuning of every shape the workload runs")
    t.add_argument("--workload", default="tiny",
                   help="a Workload YAML, a RunConfig YAML (its shapes) or a preset; default tiny")
    t.add_argument("--kernel", action="append",
                   help="tune only this kernel (repeatable; default every kernel)")
    t.add_argument("--budget", type=positive_float, default=0.25,
                   help="share of all (shape, config) pairs measured per kernel (default 0.25)")
    t.add_argument("--min-memory-cut", type=positive_float, default=4.0,
                   help="kernels whose point is memory (linear_ce) only try configs that cut "
                        "their workspace at least this many times against the unfused op "
                        "(default 4; 1 lets speed alone decide)")
    t.add_argument("--dtype", choices=("fp32", "bf16"), help="default: the config's dtype")
    t.add_argument("--cache", help="tuning cache file (default ~/.cache/autotune/kernels/<fingerprint>.json, "
                        "which the trainer reads)")
    t.add_argument("--json", action="store_true", help="print the tuned configs as JSON")
    t.set_defaults(func=tune)


def _configs_of(workload_arg: str):  # noqa: ANN202
    """The RunConfigs whose shapes are tuned: the user's, or the baseline portfolio's."""
    import yaml

    from autotune.config import RunConfig, load_yaml
    from autotune.portfolio import baseline_configs

    path = Path(workload_arg)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        try:
            keys = set(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError:
            keys = set()
        if keys & {"schedule", "parallel", "kernels"}:
            return [load_yaml(RunConfig, path)]
    return baseline_configs(load_workload(workload_arg))


def tune(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from autotune import __version__
    from autotune.kernel_tune import bench, family_tune, measurement_limit, workload_shapes
    from kernels.cache import CacheMismatch, TuningCache, shape_bucket
    from kernels.registry import KERNELS
    from kernels.tuned import default_cache_path
    from profilers.fingerprint import current_fingerprint

    wanted = args.kernel or list(KERNELS)
    unknown = [k for k in wanted if k not in KERNELS]
    if unknown:
        raise UserError(f"--kernel {unknown[0]}: no such kernel (choose from {', '.join(KERNELS)})")
    rcs = _configs_of(args.workload)
    device = rcs[0].workload.hardware.device
    if device != "cpu":
        raise UserError("kernels tune times the CPU implementations here; Triton kernels are "
                        "tuned on a GPU machine (device cuda) by the same command there")
    fp = current_fingerprint(device, __version__)
    path = Path(args.cache) if args.cache else default_cache_path(device)
    try:
        cache = TuningCache.load(path, fp.key(), json.loads(fp.model_dump_json())
                                 if hasattr(fp, "model_dump_json") else {})
    except CacheMismatch as exc:
        raise UserError(str(exc)) from None
    # one shape per cache bucket: what the trainer will look up
    buckets: dict[str, dict[str, dict]] = {k: {} for k in wanted}
    for rc in rcs:
        for k, found in workload_shapes(rc).items():
            for s in found if k in buckets else []:
                buckets[k].setdefault(shape_bucket(s), s)
    shapes = {k: list(b.values()) for k, b in buckets.items()}
    dtype_name = args.dtype or rcs[0].precision.dtype
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    summary = {}
    failed: list[dict] = []
    for name in wanted:
        spec, todo = KERNELS[name], shapes[name]
        if not todo:
            continue
        cfgs = spec.configs()
        inputs: dict[int, tuple] = {}
        itemsize = 2 if dtype == torch.bfloat16 else 4
        allowed = np.array([spec.admissible(shape, cfgs, itemsize=itemsize,
                                            min_memory_cut=args.min_memory_cut) for shape in todo])
        bar = progress(total=measurement_limit(allowed, args.budget), desc=f"tuning {name}",
                       unit="pair")

        def measure(s: int, c: int, spec=spec, todo=todo, cfgs=cfgs, inputs=inputs,  # noqa: ANN001
                    bar=bar, name=name) -> float:
            if s not in inputs:
                inputs.clear()  # one shape's inputs alive at a time
                inputs[s] = spec.make(todo[s], dtype, torch.Generator().manual_seed(s))
            bar.update()
            try:
                return bench(lambda: spec.run(inputs[s], cfgs[c]))
            except Exception as exc:  # noqa: BLE001 - a config that fails is a result
                # Out of memory or of a resource the config asks too much of (shared memory,
                # registers): slowest of all to the tuner, said in the summary, never picked.
                failed.append({"kernel": name, "shape": todo[s], "config": cfgs[c],
                               "error": f"{type(exc).__name__}: "
                                        f"{(str(exc).splitlines() or [''])[0][:200]}"})
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                return math.inf

        result = family_tune(todo, cfgs, measure, features=spec.features, budget=args.budget,
                             allowed=allowed)
        bar.close()
        for s, shape in enumerate(todo):
            if not math.isfinite(result.seconds[s]):
                continue  # every config tried failed: the kernel's default stays
            cache.put(name, shape, dtype_name, cfgs[result.best[s]], module=spec.module,
                      seconds=result.seconds[s],
                      measured=sum(1 for (t, _) in result.measured if t == s))
        cache.save()  # after each kernel: a crash loses at most the kernel being tuned
        summary[name] = {"shapes": len(todo), "configs": len(cfgs),
                         "measured_pairs": result.n_measured,
                         "tuned": [{"shape": sh, "config": cfgs[result.best[s]],
                                    "seconds": result.seconds[s]} for s, sh in enumerate(todo)
                                   if math.isfinite(result.seconds[s])],
                         "failed": [f for f in failed if f["kernel"] == name]}
    if args.json:
        print(json.dumps({"cache": str(path), "kernels": summary}, indent=2))
        return 0
    for name, r in summary.items():
        print(f"{name}: {r['shapes']} shapes x {r['configs']} configs, {r['measured_pairs']} "
              f"measured ({r['measured_pairs'] / (r['shapes'] * r['configs']):.0%})", file=sys.stdout)
        for t in r["tuned"]:
            print(f"  {t['shape']}: {t['config']} {t['seconds'] * 1e3:.2f} ms")
        for f in r["failed"]:
            print(f"  failed, not picked: {f['shape']}: {f['config']}: {f['error']}")
    print(f"cache: {path}")
    return 0
