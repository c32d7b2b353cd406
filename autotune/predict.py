"""Predicted step time, throughput and peak memory of RunConfigs, many at a time.

A config is priced on the global batches its own training run would see (the trainer's seeded
stream after its warm-up steps), planned by its scheduling policy into each data-parallel
rank's micro-batches: the sequence mix of every micro-batch is real, not an average. The
expensive parts are shared across configs: plans depend only on the workload, the schedule
and dp; op-row predictions only on the plan, tp, pp, dtype and attention kernel (and are
linear in the number of checkpointed layers, so every checkpointing policy costs one
multiply-add). Each op family is predicted in one batched call for all configs at once.
On CPUs the fused loss and norm kernels are priced in time as the unfused ops (their
measured difference is within a step's noise); on GPUs the prior prices what each moves.
The fused loss's memory counts one chunk of logits instead of all of them.

The parts live apart: the plans (``autotune.data.step_plans``, the trainer's own walk), the
table of a config's plans (``autotune.step_tables``), the ops each micro-batch runs
(``autotune.step_ops``), communication and overlap (``autotune.step_comm``) and the memory
counts (``autotune.step_memory``); this module prices and composes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import ModelDims, RunConfig
from autotune.data import load_lengths, timed_plans
from autotune.data.context_parallel import Placer
from autotune.data.plan import ChunkGroup
from autotune.errors import UserError
from autotune.step_comm import StepShape, gpu_comm, measured_comm
from autotune.step_memory import gpu_memory_units, memory_units
from autotune.step_ops import (
    layer_ops,
    loss_op,
    op_case,
    optimizer_rows,
    optimizer_tensors,
    params_per_rank,
    runs_per_step,
    signature,
)
from autotune.step_tables import PlanTable, cp_micro_batches, unit_rows
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from cost_models.gpu_prior import CollectivePrior, OpPrior
from cost_models.step import (
    MEMORY_FEATURES,
    MemoryModel,
    StepPrediction,
    alpha_beta,
    family_seconds,
)
from profilers.families import STEP_FAMILIES

__all__ = ["StepPredictor", "complete_ceilings", "datasheet_models", "default_models",
           "fits_in_memory", "prior_models"]

_FAMILIES = STEP_FAMILIES  # the composition's column order


@dataclass(frozen=True)
class PlanKey:
    """What a config's plans depend on: the data, the model, the global batch, the
    schedule, dp and the seed."""

    model: str
    data: str
    global_batch_tokens: int
    schedule: str
    dp: int
    seed: int
    cp: int = 1

    @classmethod
    def of(cls, rc: RunConfig) -> PlanKey:
        wl = rc.workload
        return cls(wl.model.model_dump_json(), wl.data.model_dump_json(),
                   wl.budget.global_batch_tokens, rc.schedule.model_dump_json(), rc.parallel.dp,
                   rc.seed, rc.parallel.cp)


@dataclass(frozen=True)
class KernelKey:
    """What one op shape's price depends on beyond the shape: the model, tp, the dtype, the
    kernels and whether blocks are compiled."""

    model: str
    tp: int
    dtype: str
    attention: str
    compiled: bool = False
    fused_norm: bool = False
    fused_loss: bool = False

    @classmethod
    def of(cls, rc: RunConfig, dims: ModelDims) -> KernelKey:
        k = rc.kernels
        return cls(dims.model_dump_json(), rc.parallel.tp, rc.precision.dtype, k.attention,
                   rc.compile == "blocks", k.norm == "fused", k.loss == "fused")

    def shapes(self) -> tuple:
        """What the op shapes depend on (not the kernels' fusion)."""
        return self.model, self.tp, self.dtype, self.attention

    def flags(self, family: str) -> tuple:
        """The fusion flags a family's price reads."""
        return {"norm": (self.compiled, self.fused_norm), "loss": (self.fused_loss,)}.get(family, ())


@dataclass(frozen=True)
class ComputeKey:
    plan: PlanKey
    kernel: KernelKey
    pp: int


@dataclass
class StageCompute:
    """One pipeline stage's compute per step and data-parallel rank, each array [step,
    rank, ...] split into what runs with no checkpointing (``base``) and what each
    checkpointed layer adds (``ckpt``): seconds per family, of forwards, and kernel runs."""

    family_base: np.ndarray  # [step, rank, family]
    family_ckpt: np.ndarray
    forward_base: np.ndarray  # [step, rank]
    forward_ckpt: np.ndarray
    runs_base: np.ndarray
    runs_ckpt: np.ndarray

    def at(self, ckpt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(family seconds, forward seconds, kernel runs) with ``ckpt`` checkpointed layers."""
        return (self.family_base + ckpt * self.family_ckpt,
                self.forward_base + ckpt * self.forward_ckpt,
                self.runs_base + ckpt * self.runs_ckpt)


class StepPredictor:
    """``predict(rc)`` for one config, ``predict_many(rcs)`` for a batch (the search's
    path); ``warmup`` and ``steps`` pick the global batches priced, as ``autotune measure``
    would run them."""

    def __init__(self, models: StepModels, *, warmup: int = 1, steps: int = 3) -> None:
        self.models = models
        self.warmup, self.steps = warmup, steps
        self._data: dict[str, object] = {}
        self._plans: dict[PlanKey, PlanTable] = {}
        self._compute: dict[ComputeKey, StageCompute] = {}
        self._sigs: dict[tuple, int] = {}  # micro-batch signature -> id
        self._sig_cost: dict[KernelKey, np.ndarray] = {}  # -> [signature, costs]
        self._rows: dict[tuple, tuple] = {}  # (shapes, signatures) -> op rows (_op_rows)
        self._fam_seconds: dict[tuple, np.ndarray] = {}  # (shapes, signatures, family, flags)
        self._optimizer: dict[tuple[int, int], float] = {}
        self._ab: dict[tuple, tuple[float, float, str]] = {}

    # ---- shared parts -------------------------------------------------------------------
    def _lengths(self, rc: RunConfig, dims: ModelDims):  # noqa: ANN202 - Lengths
        """The workload's sequence lengths, drawn once per data and model."""
        key = rc.workload.data.model_dump_json() + rc.workload.model.model_dump_json()
        if key not in self._data:
            self._data[key] = load_lengths(rc.workload.data, dims)
        return self._data[key]

    def _plans_for(self, rc: RunConfig, key: PlanKey, dims: ModelDims) -> PlanTable:
        if key in self._plans:
            return self._plans[key]
        data = self._lengths(rc, dims)
        timed = timed_plans(rc, data.lengths, dims, warmup=self.warmup, steps=self.steps)
        steps = [ranks for _, ranks in timed]
        real = [int(data.lengths[ids].sum()) for ids, _ in timed]
        if rc.parallel.cp > 1:
            self._plans[key] = out = self._cp_table(rc, dims, steps, np.array(real, float))
            return out
        units = [[unit_rows(p) for p in ranks] for ranks in steps]
        padded = np.array([[sum(mb.tokens for mb in p.micro_batches()) for p in r] for r in steps], float)
        mbs = np.array([[sum(1 for _ in p.micro_batches()) for p in r] for r in steps], float)
        longest = np.array([[max((seg.length for mb in p.micro_batches() for seg in mb.segments),
                                 default=0) for p in r] for r in steps], float)
        self._plans[key] = out = PlanTable(steps, np.array(real, float), units, padded, mbs, longest)
        return out

    @staticmethod
    def _cp_table(rc: RunConfig, dims: ModelDims, steps: list, real: np.ndarray) -> PlanTable:
        """The table of a context-parallel config: every micro-batch as its busiest rank of
        the cp group runs it (its share of tokens and attention pairs)."""
        placer = Placer.of(rc, dims)
        views = [[cp_micro_batches(p, placer) for p in ranks] for ranks in steps]
        # the gathered keys and values stand where ChunkFlow's carried state does
        units = [[np.array([(v.tokens, v.pairs, v.tokens, v.gathered, v.tokens) for v in mbs],
                           dtype=float).reshape(-1, 5) for mbs in ranks] for ranks in views]

        def grid(f) -> np.ndarray:  # noqa: ANN001
            return np.array([[f(mbs) for mbs in ranks] for ranks in views], float)

        return PlanTable(steps, real, units, grid(lambda m: sum(v.tokens for v in m)),
                         grid(len), grid(lambda m: max((max(v.seqlens) for v in m), default=0)),
                         cp=views, cp_gathered=grid(lambda m: sum(v.gathered for v in m)),
                         cp_gathers=grid(lambda m: sum(1 for v in m if v.gathered)))

    def _entries(self, plans: PlanTable) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per step and rank: each micro-batch's signature id, and whether its forward runs
        again whatever the checkpointing (a ChunkFlow chunk whose activations were dropped)."""
        if plans.entries is None and plans.cp is not None:
            plans.entries = [[(np.array([self._sigs.setdefault(v.signature, len(self._sigs))
                                         for v in mbs], int), np.zeros(len(mbs), bool))
                              for mbs in ranks] for ranks in plans.cp]
        if plans.entries is None:
            out = []
            for ranks in plans.steps:
                row = []
                for plan in ranks:
                    ids, again = [], []
                    for unit in plan.units:
                        chunks = unit.chunks if isinstance(unit, ChunkGroup) else (unit,)
                        redo = len(chunks) - unit.keep if isinstance(unit, ChunkGroup) else 0
                        for j, mb in enumerate(chunks):
                            ids.append(self._sigs.setdefault(signature(mb), len(self._sigs)))
                            again.append(j < redo)
                    row.append((np.array(ids, int), np.array(again, bool)))
                out.append(row)
            plans.entries = out
        return plans.entries

    def _price_signatures(self, kkey: KernelKey, dims: ModelDims, needed: set[int]) -> np.ndarray:
        """Per signature under one kernel key: seconds of one layer's forward and backward
        per family, of the loss forward and backward, and the op runs of a layer's forward
        and backward; every op shape priced once, one model call per family."""
        cost = self._sig_cost.get(kkey)
        width = 2 * len(_FAMILIES) + 4
        if cost is None or len(cost) < len(self._sigs):
            grown = np.full((len(self._sigs), width), np.nan)
            if cost is not None:
                grown[:len(cost)] = cost
            cost = self._sig_cost[kkey] = grown
        todo = [i for i in needed if np.isnan(cost[i, 0])]
        if not todo:
            return cost
        link, frames = self._op_rows(kkey, dims, tuple(todo))
        seconds = np.zeros(sum(len(f) for _, f in frames.values()))
        for fam, (idx, rows) in frames.items():
            # a family's prices depend on the kernel flags it reads only: configs that
            # differ in the others share them
            key = (kkey.shapes(), tuple(todo), fam, kkey.flags(fam))
            if key not in self._fam_seconds:
                self._fam_seconds[key] = self._family_seconds(rows, fam, kkey)
            seconds[idx] = self._fam_seconds[key]
        block = np.zeros((len(self._sigs), width))
        np.add.at(block, (link[:, 0], link[:, 1]), seconds[link[:, 2]])
        is_layer = link[:, 1] < 2 * len(_FAMILIES)
        runs_col = np.where(link[:, 1] < len(_FAMILIES), width - 2, width - 1)
        np.add.at(block, (link[is_layer, 0], runs_col[is_layer]), 1.0)
        cost[todo] = block[todo]
        return cost

    def _op_rows(self, kkey: KernelKey, dims: ModelDims, todo: tuple[int, ...]
                 ) -> tuple[np.ndarray, dict[str, tuple[list[int], pd.DataFrame]]]:
        """The distinct op shapes of signatures ``todo`` as case rows per family, and the
        links (signature, column, op) that sum their prices; kept, since they do not depend
        on the prices (the spread prices them again under other priors)."""
        key = (kkey.shapes(), todo)
        if key in self._rows:
            return self._rows[key]
        sigs = list(self._sigs)
        op_index: dict[tuple, int] = {}
        links = []  # (signature id, column, op index)
        for i in todo:
            sig = sigs[i]
            for p, base in (("fwd", 0), ("bwd", len(_FAMILIES))):
                for op in layer_ops(sig, dims, kkey.tp, kkey.dtype, kkey.attention, (p,)):
                    links.append((i, base + _FAMILIES.index(op[0]), op_index.setdefault(op, len(op_index))))
                op = loss_op(sig, dims, kkey.dtype, p)
                links.append((i, 2 * len(_FAMILIES) + (p == "bwd"),
                              op_index.setdefault(op, len(op_index))))
        keys = list(op_index)
        frames = {}
        for fam in _FAMILIES:
            idx = [j for j, k in enumerate(keys) if k[0] == fam]
            if idx:
                frames[fam] = (idx, pd.DataFrame([op_case(keys[j]) for j in idx]))
        self._rows[key] = out = (np.array(links), frames)
        return out

    def _family_seconds(self, rows: pd.DataFrame, family: str, kkey: KernelKey | None) -> np.ndarray:
        """One run of each row: the family's fitted model where the models hold one, else the
        GPU prior where planning for a GPU, else the roofline on the ceilings."""
        m = self.models
        if family in m.families or m.op_prior is None:
            return family_seconds(rows, family, m.ceilings, m.families)
        if kkey is None:
            return m.op_prior.seconds(rows, family)
        return m.op_prior.seconds(rows, family, compiled=kkey.compiled, impl=kkey.attention,
                                  fused_norm=kkey.fused_norm, fused_loss=kkey.fused_loss)

    def _compute_for(self, ckey: ComputeKey, plans: PlanTable, dims: ModelDims) -> StageCompute:
        if ckey in self._compute:
            return self._compute[ckey]
        entries = self._entries(plans)
        needed = {int(i) for row in entries for ids, _ in row for i in ids}
        cost = self._price_signatures(ckey.kernel, dims, needed)
        layers = dims.layers // ckey.pp
        nf = len(_FAMILIES)
        shape = (len(entries), len(entries[0]))
        out = StageCompute(np.zeros(shape + (nf,)), np.zeros(shape + (nf,)), np.zeros(shape),
                           np.zeros(shape), np.zeros(shape), np.zeros(shape))
        for s, row in enumerate(entries):
            for r, (ids, again) in enumerate(row):
                c = cost[ids]
                fwd, bwd = c[:, :nf], c[:, nf:2 * nf]
                lf, lb, rf, rb = c[:, 2 * nf], c[:, 2 * nf + 1], c[:, 2 * nf + 2], c[:, 2 * nf + 3]
                n = runs_per_step(layers, again.astype(float))
                col = {k: v[:, None] for k, v in n.items()}
                out.family_base[s, r] = (col["fwd"] * fwd + col["bwd"] * bwd).sum(0)
                loss_s = lf * n["loss_fwd"]
                out.family_base[s, r, _FAMILIES.index("loss")] += (loss_s + lb * n["loss_bwd"]).sum()
                out.family_ckpt[s, r] = (col["ckpt_fwd"] * fwd).sum(0)
                out.forward_base[s, r] = (col["fwd"] * fwd).sum() + loss_s.sum()
                out.forward_ckpt[s, r] = (col["ckpt_fwd"] * fwd).sum()
                out.runs_base[s, r] = (n["fwd"] * rf + n["bwd"] * rb + n["loss_fwd"]
                                       + n["loss_bwd"]).sum()
                out.runs_ckpt[s, r] = (n["ckpt_fwd"] * rf).sum()
        self._compute[ckey] = out
        return out

    def _alpha_beta(self, collective: str, ranks: int, device: str) -> tuple[float, float, str]:
        key = (collective, ranks, device)
        if key not in self._ab:
            self._ab[key] = alpha_beta(collective, ranks, self.models.collective_fits, device)
        return self._ab[key]

    def _optimizer_s(self, numel: int, tensors: int) -> float:
        key = (numel, tensors)
        if key not in self._optimizer:
            rows = optimizer_rows(numel, tensors)
            self._optimizer[key] = float(self._family_seconds(rows, "optimizer", None)[0])
        return self._optimizer[key]

    def _prefetch(self, keyed: list[tuple]) -> None:
        """Price every signature the batch needs per kernel key in one pass, so that each
        family's model is called once per kernel key rather than once per plan."""
        need: dict[KernelKey, tuple[ModelDims, set[int]]] = {}
        for _, dims, plans, ckey in keyed:
            if ckey in self._compute:
                continue
            ids = need.setdefault(ckey.kernel, (dims, set()))[1]
            for row in self._entries(plans):
                for sig_ids, _ in row:
                    ids.update(int(i) for i in sig_ids)
        for kkey, (dims, ids) in need.items():
            self._price_signatures(kkey, dims, ids)

    # ---- composition --------------------------------------------------------------------
    def compose(self, rcs: list[RunConfig]) -> tuple[pd.DataFrame, list[np.ndarray]]:
        """Per config: the composed (pre-residual) breakdown and the residual's features,
        and its units' memory features (one row per unit, ``MEMORY_FEATURES`` columns)."""
        dims_cache: dict[str, ModelDims] = {}
        keyed = []
        for rc in rcs:
            mkey = rc.workload.model.model_dump_json()
            if mkey not in dims_cache:
                dims_cache[mkey] = rc.workload.model.resolve()
            dims = dims_cache[mkey]
            pkey = PlanKey.of(rc)
            plans = self._plans_for(rc, pkey, dims)
            keyed.append((rc, dims, plans, ComputeKey(pkey, KernelKey.of(rc, dims), rc.parallel.pp)))
        self._prefetch(keyed)
        rows, units = [], []
        for rc, dims, plans, ckey in keyed:
            row, unit = self._compose_one(rc, dims, plans, self._compute_for(ckey, plans, dims))
            rows.append(row)
            units.append(unit)
        return pd.DataFrame(rows), units

    @staticmethod
    def unit_frame(units: list[np.ndarray], index: Sequence[int] | None = None) -> pd.DataFrame:
        """The memory-unit arrays of ``compose`` as one frame, ``config`` naming each
        unit's config (its position, or ``index[position]``)."""
        index = np.arange(len(units)) if index is None else np.asarray(index)
        frame = pd.DataFrame(np.vstack(units), columns=list(MEMORY_FEATURES))
        frame["config"] = np.repeat(index, [len(u) for u in units])
        return frame

    def _compose_one(self, rc: RunConfig, dims: ModelDims, plans: PlanTable,
                     compute: StageCompute) -> tuple[dict, np.ndarray]:
        p, dev = rc.parallel, rc.workload.hardware.device
        layers = dims.layers // p.pp
        ckpt = min(rc.checkpointing.checkpointed_layers(dims.layers), dims.layers) // p.pp
        fam, fwd, runs = compute.at(ckpt)
        per_rank = fam.sum(-1)
        slow = per_rank.argmax(1)  # the replica every step waits for
        steps = np.arange(len(slow))
        fam_s = fam[steps, slow].mean(0)
        compute_s = float(per_rank.max(1).mean())
        forward_s = float(fwd[steps, slow].mean())
        recompute_s = float((ckpt * compute.family_ckpt)[steps, slow].sum(-1).mean())
        op_runs = float(runs[steps, slow].mean())
        params = params_per_rank(dims, p.tp, p.pp, p.dp, p.zero_stage)
        opt_s = self._optimizer_s(params, optimizer_tensors(dims, p.pp))
        act_bytes = rc.precision.itemsize
        mbs = float(plans.micro_batches[steps, slow].mean())
        padded = float(plans.padded[steps, slow].mean())
        breakdown = {f: float(v) for f, v in zip(_FAMILIES, fam_s)} | {"optimizer": opt_s}
        gathered = float(plans.cp_gathered[steps, slow].mean()) if plans.cp is not None else 0.0
        gathers = float(plans.cp_gathers[steps, slow].mean()) if plans.cp is not None else 0.0
        step = StepShape(compute_s, forward_s, mbs, padded, layers, ckpt, act_bytes, gathered,
                         gathers)
        if dev == "cuda":
            comm, sources = gpu_comm(self.models, self._alpha_beta, rc, dims, step)
        else:
            comm, sources = measured_comm(self._alpha_beta, rc, dims, step)
        breakdown |= comm.breakdown()
        exposed = comm.exposed_s
        composed = compute_s + opt_s + exposed + comm.bubble_s + comm.copies_s
        row = {
            "composed_step_s": composed, "tokens_per_step": float(plans.real_tokens.mean()),
            "compute_s": compute_s + opt_s, "comm_s": exposed, "bubble_s": comm.bubble_s,
            "log_compute_s": math.log(compute_s + opt_s), "comm_share": exposed / composed,
            "log_tokens_per_micro_batch": math.log(padded / max(mbs, 1.0)),
            "log_micro_batches": math.log(max(mbs, 1.0)),
            "padding_fraction": 1 - plans.real_tokens.mean() / (padded * p.dp),
            "attention_share": breakdown["attention"] / max(compute_s, 1e-12),
            "recompute_share": recompute_s / max(compute_s, 1e-12),
            "world": p.world_size, "dp": p.dp, "tp": p.tp, "pp": p.pp,
            "zero_stage": p.zero_stage, "bf16": float(rc.precision.dtype == "bf16"),
            "op_runs": op_runs, "cpu_ranks_sharing": self._sharing(rc),
            "breakdown": breakdown, "sources": sources, "overlapped_s": comm.overlapped_s,
        }
        if dev == "cuda":
            return row, gpu_memory_units(rc, dims, plans, layers, ckpt)
        return row, memory_units(rc, dims, plans, layers, ckpt, act_bytes)

    @staticmethod
    def _sharing(rc: RunConfig) -> float:
        """How many ranks share one host's cores (CPU runs: torchrun gives each rank one
        thread of its own, where the profile's ops had the whole host)."""
        if rc.workload.hardware.device != "cpu":
            return 1.0
        return float(min(rc.parallel.world_size, rc.workload.hardware.devices_per_node))

    # ---- predictions --------------------------------------------------------------------
    def predict_many(self, rcs: list[RunConfig]) -> pd.DataFrame:
        """One row per config: step_time_s, tokens_per_s, peak_mem_bytes, composed_step_s,
        the breakdown (one column per part, seconds) and the residual's features."""
        rcs = list(rcs)
        if not rcs:
            return pd.DataFrame()
        comp, units = self.compose(rcs)
        comp["step_time_s"] = self.models.residual.predict(comp)
        comp["residual_s"] = comp["step_time_s"] - comp["composed_step_s"]
        comp["tokens_per_s"] = comp["tokens_per_step"] / comp["step_time_s"]
        comp["peak_mem_bytes"] = [float(self.models.memory.unit_bytes(u).max()) for u in units]
        return comp

    def flops_per_token(self, rc: RunConfig) -> float:
        """Model FLOPs per real token of ``rc``'s data, as ``train.flops.model_flops`` counts
        a step (6 x matmul parameters, plus causal attention's term, which grows with each
        sequence's length: sum of squares over sum of lengths)."""
        from autotune.train.flops import model_flops

        dims = rc.workload.model.resolve()
        lengths = self._lengths(rc, dims).lengths
        return model_flops(dims, lengths) / float(lengths.sum())

    def utilization(self, rc: RunConfig, tokens_per_s: float) -> dict[str, float]:
        """Per-device throughput and MFU over the ceiling the models price with (a measured
        matmul ceiling, or a datasheet's published peak when planning for absent GPUs)."""
        world = rc.parallel.world_size
        peak = self.models.ceilings.flops_per_s[rc.precision.dtype]
        return {"world": world, "tokens_per_s_per_device": tokens_per_s / world,
                "mfu": tokens_per_s * self.flops_per_token(rc) / (peak * world)}

    def predict(self, rc: RunConfig) -> StepPrediction:
        row = self.predict_many([rc]).iloc[0]
        m = self.models
        breakdown = dict(row["breakdown"]) | {"residual": float(row["residual_s"])}
        sources = m.sources() | {f"comm_{k}": v for k, v in row["sources"].items()}
        return StepPrediction(float(row["step_time_s"]), float(row["tokens_per_s"]),
                              float(row["peak_mem_bytes"]), breakdown, m.calibration, sources,
                              m.residual.n_measurements, m.memory.n_measurements,
                              float(row["overlapped_s"]), self.spread(rc))

    def repriced(self, models: StepModels) -> StepPredictor:
        """A predictor pricing with ``models`` that shares this one's data, plans and op
        signatures, which do not depend on the prices."""
        other = StepPredictor(models, warmup=self.warmup, steps=self.steps)
        other._data, other._plans, other._sigs, other._rows = (self._data, self._plans,
                                                               self._sigs, self._rows)
        return other

    def spread(self, rc: RunConfig) -> dict[str, float]:
        """Step time and tokens/s at the ends of the GPU prior's spread (its cited figures'
        10th and 90th percentiles around each fit), where the prior prices the config."""
        from dataclasses import replace

        m = self.models
        if m.op_prior is None:
            return {}
        out = {}
        for q in ("low", "high"):
            alt = replace(m, op_prior=m.op_prior.at(q),
                          collective_prior=m.collective_prior.at(q) if m.collective_prior else None)
            row = self.repriced(alt).predict_many([rc]).iloc[0]
            out[f"step_time_s_{q}"] = float(row["step_time_s"])
        out["tokens_per_s_low"] = float(row["tokens_per_step"]) / out["step_time_s_high"]
        out["tokens_per_s_high"] = float(row["tokens_per_step"]) / out["step_time_s_low"]
        return out


def fits_in_memory(models: StepModels, *, margin: float):  # noqa: ANN201 - Fits
    """A memory check for ``autotune.portfolio``: whether a config's predicted peak stays
    ``margin`` below its workload's memory cap."""
    from autotune.tune.strategies import memory_limit

    predictor = StepPredictor(models)

    def fits(rc: RunConfig) -> bool:
        limit = memory_limit(rc.workload, margin)
        return bool(predictor.predict_many([rc]).peak_mem_bytes.iloc[0] <= limit)

    return fits


def complete_ceilings(ceilings: Ceilings, device: str,
                      dtypes: tuple[str, ...] = ("fp32", "bf16")) -> Ceilings:
    """``ceilings`` with every dtype the search may pick: a profile covers the dtypes of its
    space, so the others come from this machine's measured (cached) matmul ceiling."""
    missing = [d for d in dtypes if d not in ceilings.flops_per_s]
    if not missing:
        return ceilings
    from profilers.ceilings import matmul_ceiling

    rates = dict(ceilings.flops_per_s) | {d: matmul_ceiling(d, device).flops_per_s for d in missing}
    return Ceilings(rates, ceilings.bytes_per_s,
                    f"{ceilings.source}; {', '.join(missing)} matmul ceiling measured apart")


def prior_models(device: str = "cpu", dtypes: tuple[str, ...] = ("fp32", "bf16"), *,
                 device_name: str | None = None) -> StepModels:
    """The analytic prior alone, for planning before any profile exists: on this machine's
    measured ceilings (cached by the profilers), or, for CUDA on a machine without a GPU,
    on the published peaks of ``device_name`` (``datasheet_models``)."""
    from autotune import __version__
    from profilers.ceilings import copy_bandwidth, matmul_ceiling
    from profilers.fingerprint import current_fingerprint

    if device == "cuda" and not _gpu_here():
        return datasheet_models(device_name)
    ceil = Ceilings({d: matmul_ceiling(d, device).flops_per_s for d in dtypes},
                    copy_bandwidth(device).bytes_per_s, source="measured ceilings, prior only")
    fingerprint = current_fingerprint(device, __version__).key()
    memory = MemoryModel.traced_gpu() if device == "cuda" else None
    return StepModels(fingerprint, device, ceil, memory=memory)


def _gpu_here() -> bool:
    import torch

    return torch.cuda.is_available()  # cudaGetDeviceCount: no CUDA context is created


def datasheet_models(device_name: str | None) -> StepModels:
    """The prior for a GPU that is absent: its published peaks (MFU's denominator) and the
    GPU prior of cited public measurements (``cost_models.gpu_prior``) for every op family
    and collective. Every figure priced on it is a prediction, and its sources say so."""
    from profilers.ceilings import datasheet, datasheet_names

    row = datasheet(device_name) if device_name else None
    if row is None:
        what = f"hardware.device_name {device_name!r} is not" if device_name else \
            "hardware.device_name is not given, and it is"
        raise UserError(f"{what} a GPU of the datasheet table, which planning without the GPU "
                        f"prices from; use one of {', '.join(datasheet_names())}")
    ceil = Ceilings({"bf16": row.peak_flops("bf16"), "fp32": row.peak_flops("fp32")},
                    row.memory_bandwidth_gbs * 1e9,
                    source=f"datasheet {row.name} (published peaks, not measured)")
    op_prior, coll = gpu_priors(row.name)
    return StepModels(f"datasheet:{row.name}", "cuda", ceil, memory=MemoryModel.traced_gpu(),
                      op_prior=op_prior, collective_prior=coll)


def gpu_priors(name: str) -> tuple[OpPrior, CollectivePrior]:
    """The op and collective priors of datasheet GPU ``name``; one line naming what is
    missing where the data files hold no figures for it."""
    try:
        return OpPrior.for_device(name), CollectivePrior.for_device(name)
    except KeyError as exc:
        raise UserError(f"{name}: the GPU prior has no cited figures to price it "
                        f"({exc.args[0]}); see cost_models/data/gpu/SOURCES.md") from None


def default_models(folder: str | Path | None, device: str = "cpu", *,
                   device_name: str | None = None) -> StepModels:
    """Fitted models from ``folder`` (checked against this machine), or the prior alone
    when no folder is given."""
    if folder is None:
        return prior_models(device, device_name=device_name)
    if device == "cuda" and not _gpu_here():
        raise UserError(f"--models {folder}: fitted models are checked against the GPU they "
                        f"were fitted on, and this machine has none; plan from the datasheet "
                        f"with --models prior")
    from autotune import __version__
    from profilers.fingerprint import current_fingerprint

    return StepModels.load(Path(folder), current_fingerprint(device, __version__).key())
