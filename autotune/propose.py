"""Candidates proposed by an Optuna study on the step model's predictions, for what exact
pricing of every candidate cannot give: a space too large to enumerate (TPE, single
objective: predicted tokens/s, with predicted peak memory under the cap as a constraint), and
the throughput/memory Pareto front (NSGA-II, two objectives). Thousands of predicted trials
take seconds: configs are priced a batch of asks at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from autotune.config import POLICY_KNOBS, SCHEDULE_KNOBS, RunConfig, SearchSpace, Workload
from autotune.predict import StepPredictor

__all__ = ["SpaceEncoding", "pareto_front", "propose", "space_size"]


class SpaceEncoding:
    """Configs as Optuna parameters: the policy, then the knobs that policy reads, the
    parallel layout, the ZeRO stage where there is data parallelism, checkpointing, kernels
    and dtype. A combination that breaks a validity rule (or is no candidate, when built from
    a candidate list) is None."""

    def __init__(self, candidates: Sequence[RunConfig] = (), *, space: SearchSpace | None = None,
                 workload: Workload | None = None) -> None:
        self.by_key: dict[tuple, RunConfig | None] = {}
        self.choices: dict[str, list] = {}
        self.closed = space is None  # only the listed candidates exist
        for rc in candidates:
            params = self.params(rc)
            self.by_key[self._key(params)] = rc
            for name, value in params.items():
                self.choices.setdefault(name, [])
                if value not in self.choices[name]:
                    self.choices[name].append(value)
        if space is not None:
            if workload is None:
                raise ValueError("a SearchSpace needs its workload")
            self.space, self.workload = space, workload
            self.choices |= {"policy": list(space.policy), "layout": [
                f"dp{dp}-tp{tp}-pp{pp}-cp{cp}" for dp, tp, pp, cp in space.parallel_layouts(workload)],
                "checkpointing": list(space.checkpointing), "attention": list(space.attention),
                "dtype": list(space.dtype), "zero_stage": list(space.zero_stage),
                "compile": list(space.compile)}
            for k in SCHEDULE_KNOBS:
                self.choices[k] = list(getattr(space, k))
        for values in self.choices.values():
            values.sort(key=lambda v: (isinstance(v, str), v))

    @staticmethod
    def _key(params: dict) -> tuple:
        return tuple(sorted(params.items()))

    @staticmethod
    def params(rc: RunConfig) -> dict:
        p = rc.parallel
        out = {"policy": rc.schedule.policy,
               **{k: getattr(rc.schedule, k) for k in POLICY_KNOBS[rc.schedule.policy]},
               "layout": f"dp{p.dp}-tp{p.tp}-pp{p.pp}-cp{p.cp}",
               "checkpointing": rc.checkpointing.policy, "attention": rc.kernels.attention,
               "dtype": rc.precision.dtype, "compile": rc.compile}
        if p.dp > 1:
            out["zero_stage"] = p.zero_stage
        return out

    def suggest(self, trial) -> RunConfig | None:  # noqa: ANN001 - optuna.Trial
        policy = trial.suggest_categorical("policy", self.choices["policy"])
        params = {"policy": policy}
        for k in POLICY_KNOBS[policy]:
            params[k] = trial.suggest_categorical(k, self.choices[k])
        for k in ("layout", "checkpointing", "attention", "dtype", "compile"):
            params[k] = trial.suggest_categorical(k, self.choices[k])
        if not params["layout"].startswith("dp1-") and "zero_stage" in self.choices:
            params["zero_stage"] = trial.suggest_categorical("zero_stage", self.choices["zero_stage"])
        key = self._key(params)
        if key not in self.by_key and not self.closed:
            self.by_key[key] = self._build(params)
        return self.by_key.get(key)

    def _build(self, params: dict) -> RunConfig | None:
        dp, tp, pp, cp = (int(x[2:]) for x in params["layout"].split("-"))
        ignored = {k: getattr(self.space, k)[0] for k in
                   SCHEDULE_KNOBS}
        sched = ignored | {k: v for k, v in params.items() if k in ignored} | {"policy": params["policy"]}
        try:
            return RunConfig.model_validate({
                "workload": self.workload, "schedule": sched,
                "parallel": {"dp": dp, "tp": tp, "pp": pp, "cp": cp,
                             "zero_stage": params.get("zero_stage", 0)},
                "checkpointing": {"policy": params["checkpointing"]},
                "kernels": {"attention": params["attention"]},
                "precision": {"dtype": params["dtype"]}, "compile": params["compile"]})
        except ValueError:
            return None


def space_size(space: SearchSpace, workload: Workload) -> int:
    """How many configs ``space.grid`` would try before validity rules (an upper bound on
    the candidates, computed without building one)."""
    layouts = space.parallel_layouts(workload)
    per_layout = sum(len(space.zero_stage) if dp > 1 else 1 for dp, *_ in layouts)
    rest = len(space.checkpointing) * len(space.attention) * len(space.dtype)
    sched = sum(math.prod(len(getattr(space, k)) for k in POLICY_KNOBS[p])
                for p in space.policy)
    return sched * per_layout * rest


def propose(encoding: SpaceEncoding, predictor: StepPredictor, *, trials: int, keep: int,
            cap_bytes: float, margin: float = 0.1, pareto: bool = False, seed: int = 0,
            batch: int = 64) -> list[RunConfig]:
    """Run ``trials`` predicted trials (TPE, or NSGA-II with ``pareto``) and return up to
    ``keep`` distinct configs: the best predicted that fit the cap, or the predicted Pareto
    front (highest tokens/s first) followed by the best of the rest."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    limit = cap_bytes * (1 - margin)

    if pareto:
        sampler = optuna.samplers.NSGAIISampler(seed=seed)
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        study = optuna.create_study(direction="maximize", sampler=sampler)
    seen: dict[str, tuple[RunConfig, float, float]] = {}
    asked = 0
    while asked < trials:
        asks = [study.ask() for _ in range(min(batch, trials - asked))]
        asked += len(asks)
        rcs = [encoding.suggest(t) for t in asks]
        fresh = list({rc.model_dump_json(): rc for rc in rcs
                      if rc is not None and rc.model_dump_json() not in seen}.values())
        if fresh:
            pred = predictor.predict_many(fresh)
            for rc, tps, peak in zip(fresh, pred.tokens_per_s, pred.peak_mem_bytes, strict=True):
                seen[rc.model_dump_json()] = (rc, float(tps), float(peak))
        for t, rc in zip(asks, rcs, strict=True):
            if rc is None:
                study.tell(t, state=optuna.trial.TrialState.FAIL)
                continue
            _, tps, peak = seen[rc.model_dump_json()]
            t.set_constraint("memory", (peak - limit) / limit)  # feasible at <= 0
            study.tell(t, [tps, peak] if pareto else tps)
    rows = sorted(seen.values(), key=lambda r: -r[1])
    fit = [r for r in rows if r[2] <= limit]
    if not pareto:
        return [rc for rc, *_ in fit[:keep]]
    front = pareto_front([(r[1], r[2]) for r in fit])
    first = [fit[i][0] for i in front]
    rest = [rc for i, (rc, *_) in enumerate(fit) if i not in set(front)]
    return (first + rest)[:keep]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other beats on both (higher first value, lower second),
    highest first value first."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    out, lowest = [], np.inf
    for i in order:
        if points[i][1] < lowest:
            out.append(i)
            lowest = points[i][1]
    return out
