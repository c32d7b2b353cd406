"""Kernel configs tuned per family, FamilySeer style: the shapes of one kernel share a ranker,
so measuring a few configs on a few shapes tells the rest which configs to try.

``family_tune`` measures a spread of configs on two anchor shapes (the smallest and the
largest), fits an XGBoost ``rank:pairwise`` ranker over shape and config features, then for
every other shape measures the config that won on its nearest tuned sibling and the ranker's
top picks, refitting the ranker after each shape; the answer per shape is its best
*measured* config. ``independent_tune`` is the comparison: the same budget spent per shape
with no sharing (random configs). Both take a ``measure(shape_index, config_index)`` that
returns seconds (a live timer or a recorded table), and optionally an ``allowed`` mask
(shapes x configs): pairs outside it, such as a fused loss's chunk sizes that would not cut
memory enough, are never measured nor picked.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["TuneResult", "bench", "family_tune", "independent_tune", "measurement_limit"]

Measure = Callable[[int, int], float]
Features = Callable[[dict, dict], dict[str, float]]


@dataclass
class TuneResult:
    best: list[int]  # per shape: index of its best measured config
    seconds: list[float]  # per shape: that config's measured time
    measured: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def n_measured(self) -> int:
        return len(self.measured)


def bench(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5,
          min_s: float = 0.02) -> float:
    """Median seconds of ``fn()``: ``warmup`` discarded calls, then at least ``repeats``
    calls and at least ``min_s`` in all (short kernels are repeated more, as Triton's
    do_bench does)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def _size(shape: dict) -> float:
    return float(np.prod([max(int(v), 1) for v in shape.values()]))


def _features(shapes: Sequence[dict], configs: Sequence[dict], pairs: Sequence[tuple[int, int]],
              features: Features) -> pd.DataFrame:
    return pd.DataFrame([features(shapes[s], configs[c]) for s, c in pairs])


def _mask(n_s: int, n_c: int, allowed: np.ndarray | None) -> np.ndarray:
    mask = np.ones((n_s, n_c), bool) if allowed is None else np.asarray(allowed, bool)
    if mask.shape != (n_s, n_c) or not mask.any(axis=1).all():
        raise ValueError("allowed must be shapes x configs with at least one config per shape")
    return mask


def measurement_limit(allowed: np.ndarray, budget: float) -> int:
    """Pairs ``family_tune`` measures at most: ``budget`` of the allowed ones, but never
    fewer than two per shape (one to transfer, one to try)."""
    total = int(np.asarray(allowed, bool).sum())
    return max(int(budget * total), min(total, 2 * len(allowed)))


def family_tune(shapes: Sequence[dict], configs: Sequence[dict], measure: Measure, *,
                features: Features, budget: float = 0.25, anchor_share: float = 0.33,
                seed: int = 0, allowed: np.ndarray | None = None) -> TuneResult:
    """At most ``budget`` of all allowed (shape, config) pairs measured; ``anchor_share`` of
    the configs are measured on each of the two anchor shapes."""
    n_s, n_c = len(shapes), len(configs)
    mask = _mask(n_s, n_c, allowed)
    limit = measurement_limit(mask, budget)
    rng = np.random.default_rng(seed)
    measured: dict[tuple[int, int], float] = {}

    def take(s: int, c: int, *, past_limit: bool = False) -> None:
        if mask[s, c] and (s, c) not in measured and (past_limit or len(measured) < limit):
            measured[(s, c)] = float(measure(s, c))

    order = sorted(range(n_s), key=lambda s: _size(shapes[s]))
    anchors = [order[0], order[-1]] if n_s > 1 else order
    for s in anchors:
        own = [int(c) for c in rng.permutation(n_c) if mask[s, c]]
        # half the budget to the anchors when other shapes wait for the ranker, all otherwise
        share = limit // (2 * len(anchors)) if n_s > len(anchors) else limit // len(anchors)
        per_anchor = max(2, min(len(own), int(anchor_share * len(own)), share))
        for c in own[:per_anchor]:
            take(s, c)
    rest = [s for s in order if s not in anchors]
    # one measurement per shape held back for a last pass with the ranker fitted on all
    reserve = len(rest) if limit - len(measured) >= 3 * len(rest) else 0
    tuned = list(anchors)
    for i, s in enumerate(rest):
        room = (limit - reserve - len(measured)) // (len(rest) - i)
        if room <= 0:
            break
        scores = _ranked(shapes, configs, measured, features, s)
        # the nearest tuned sibling's winner first (FamilySeer's transfer), then the ranker
        near = min(tuned, key=lambda t: abs(math.log(_size(shapes[t]) / _size(shapes[s]))))
        sibling = min((c for (t, c) in measured if t == near), key=lambda c: measured[(near, c)])
        picks = [c for c in [sibling] + [int(c) for c in np.argsort(-scores) if int(c) != sibling]
                 if mask[s, c]]
        for c in picks[:room]:
            take(s, c)
        tuned.append(s)
    for s in rest if reserve else []:
        scores = _ranked(shapes, configs, measured, features, s)
        nxt = next((int(c) for c in np.argsort(-scores)
                    if mask[s, int(c)] and (s, int(c)) not in measured), None)
        if nxt is not None:
            take(s, nxt)
    # A config that failed (out of memory or of shared memory) is measured as inf. A shape
    # whose every measured config failed gets more, past the budget, in the ranker's order,
    # until one runs: "no config found" only when none of the allowed ones does.
    for s in order:
        while not any(math.isfinite(t) for (t_s, _), t in measured.items() if t_s == s):
            scores = _ranked(shapes, configs, measured, features, s)
            nxt = next((int(c) for c in np.argsort(-scores)
                        if mask[s, int(c)] and (s, int(c)) not in measured), None)
            if nxt is None:
                break
            take(s, nxt, past_limit=True)
    return _result(n_s, measured)


def _ranked(shapes: Sequence[dict], configs: Sequence[dict], measured: dict, features: Features,
            s: int) -> np.ndarray:
    """The ranker, fitted on every measurement so far, scoring every config on shape ``s``
    (higher: faster)."""
    import xgboost as xgb

    from cost_models.family import fit_pairwise

    pairs = list(measured)
    ranker = fit_pairwise(_features(shapes, configs, pairs, features),
                          np.array([measured[p] for p in pairs]),
                          np.array([p[0] for p in pairs]), rounds=60)
    x = _features(shapes, configs, [(s, c) for c in range(len(configs))], features)
    return ranker.predict(xgb.DMatrix(x.to_numpy(float), feature_names=list(x.columns)))


def independent_tune(shapes: Sequence[dict], configs: Sequence[dict], measure: Measure, *,
                     per_shape: int, seed: int = 0, allowed: np.ndarray | None = None
                     ) -> TuneResult:
    """``per_shape`` random (allowed) configs measured on every shape, nothing shared."""
    mask = _mask(len(shapes), len(configs), allowed)
    rng = np.random.default_rng(seed)
    measured = {}
    for s in range(len(shapes)):
        own = [int(c) for c in rng.permutation(len(configs)) if mask[s, c]]
        for c in own[:per_shape]:
            measured[(s, c)] = float(measure(s, c))
    return _result(len(shapes), measured)


def _result(n_s: int, measured: dict[tuple[int, int], float]) -> TuneResult:
    best, seconds = [], []
    for s in range(n_s):
        mine = {c: t for (t_s, c), t in measured.items() if t_s == s}
        c = min(mine, key=mine.get) if mine else -1
        best.append(c)
        seconds.append(mine[c] if mine else math.inf)
    return TuneResult(best, seconds, measured)


def workload_shapes(rc, *, steps: int = 3) -> dict[str, list[dict]]:  # noqa: ANN001 - RunConfig
    """The shapes ``rc``'s training steps run, per tunable kernel: one representative (the
    most frequent) per shape bucket, largest first."""
    from collections import Counter
    from itertools import islice

    from autotune.data import load_dataset, step_plans
    from autotune.step_ops import step_op_rows
    from kernels.cache import shape_bucket
    from kernels.registry import KERNELS

    dims = rc.workload.model.resolve()
    data = load_dataset(rc.workload.data, dims)
    seen: dict[str, Counter] = {k: Counter() for k in KERNELS}
    for batch in islice(step_plans(rc, data.lengths, dims), steps):
        rows = step_op_rows(rc, batch.ranks[0], dims)
        for kernel, spec in KERNELS.items():
            if spec.family in rows:
                for shape, n in spec.shapes(rows[spec.family]):
                    seen[kernel][tuple(shape.items())] += n
    out: dict[str, list[dict]] = {}
    for kernel, counts in seen.items():
        by_bucket: dict[str, tuple[int, dict]] = {}
        for key, n in counts.items():
            shape = dict(key)
            b = shape_bucket(shape)
            if b not in by_bucket or n > by_bucket[b][0]:
                by_bucket[b] = (n, shape)
        out[kernel] = sorted((s for _, s in by_bucket.values()), key=_size, reverse=True)
    return out


def tune_kernels(rcs, wanted: Sequence[str], cache, *, dtype_name: str, budget: float,  # noqa: ANN001
                 min_memory_cut: float) -> dict:
    """``autotune kernels tune``: every shape the configs ``rcs`` run, one per cache bucket,
    family-tuned per kernel in ``wanted`` and put in ``cache`` (saved after each kernel: a
    crash loses at most the kernel being tuned). A config that fails is a result, the
    slowest of all, never picked, and said in the summary."""
    import torch

    from kernels.cache import shape_bucket
    from kernels.registry import KERNELS
    from profilers.progress import progress

    buckets: dict[str, dict[str, dict]] = {k: {} for k in wanted}
    for rc in rcs:
        for k, found in workload_shapes(rc).items():
            for s in found if k in buckets else []:
                buckets[k].setdefault(shape_bucket(s), s)
    shapes = {k: list(b.values()) for k, b in buckets.items()}
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    summary = {}
    for name in wanted:
        spec, todo = KERNELS[name], shapes[name]
        if not todo:
            continue
        cfgs, failed = spec.configs(), []
        allowed = np.array([spec.admissible(shape, cfgs, itemsize=2 if dtype == torch.bfloat16 else 4,
                                            min_memory_cut=min_memory_cut) for shape in todo])
        bar = progress(total=measurement_limit(allowed, budget), desc=f"tuning {name}", unit="pair")
        measure = _kernel_measure(spec, todo, cfgs, dtype, bar, failed)
        result = family_tune(todo, cfgs, measure, features=spec.features, budget=budget,
                             allowed=allowed)
        bar.close()
        for s, shape in enumerate(todo):
            if math.isfinite(result.seconds[s]):  # else every config tried failed: default stays
                cache.put(name, shape, dtype_name, cfgs[result.best[s]], module=spec.module,
                          seconds=result.seconds[s],
                          measured=sum(1 for (t, _) in result.measured if t == s))
        cache.save()
        summary[name] = {"shapes": len(todo), "configs": len(cfgs),
                         "measured_pairs": result.n_measured,
                         "tuned": [{"shape": sh, "config": cfgs[result.best[s]],
                                    "seconds": result.seconds[s]} for s, sh in enumerate(todo)
                                   if math.isfinite(result.seconds[s])],
                         "failed": failed}
    return summary


def _kernel_measure(spec, todo: list[dict], cfgs: list[dict], dtype, bar, failed: list[dict]  # noqa: ANN001
                    ) -> Measure:
    """Seconds of config ``c`` on shape ``s``, one shape's inputs alive at a time; a config
    that fails (out of memory, or of shared memory or registers) is infinitely slow."""
    import torch

    inputs: dict[int, tuple] = {}

    def measure(s: int, c: int) -> float:
        if s not in inputs:
            inputs.clear()
            inputs[s] = spec.make(todo[s], dtype, torch.Generator().manual_seed(s))
        bar.update()
        try:
            return bench(lambda: spec.run(inputs[s], cfgs[c]))
        except Exception as exc:  # noqa: BLE001 - a config that fails is a result
            failed.append({"kernel": spec.name, "shape": todo[s], "config": cfgs[c],
                           "error": f"{type(exc).__name__}: "
                                    f"{(str(exc).splitlines() or [''])[0][:200]}"})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return math.inf

    return measure
