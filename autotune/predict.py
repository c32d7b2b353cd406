"""Predicted step time, throughput and peak memory of RunConfigs, many at a time.

A config is priced on the global batches its own training run would see (the trainer's seeded
stream after its warm-up steps), planned by its scheduling policy into each data-parallel
rank's micro-batches: the sequence mix of every micro-batch is real, not an average. The
expensive parts are shared across configs: plans depend only on the workload, the schedule
and dp; op-row predictions only on the plan, tp, pp, dtype and attention kernel (and are
linear in the number of checkpointed layers, so every checkpointing policy costs one
multiply-add). Each op family is predicted in one batched call for all configs at once.
The fused loss and norm kernels are priced in time as the unfused ops (on this CPU their
measured difference is within a step's noise); the fused loss's memory counts one chunk of
logits instead of all of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from autotune.config import ModelDims, RunConfig
from autotune.data import load_lengths, timed_plans
from autotune.data.plan import ChunkGroup, StepPlan
from autotune.errors import UserError
from autotune.step_ops import (
    layer_ops,
    loss_op,
    op_case,
    optimizer_rows,
    optimizer_tensors,
    params_per_rank,
    signature,
)
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from cost_models.gpu_prior import CollectivePrior, Group, OpPrior
from cost_models.step import (
    MEMORY_FEATURES,
    MemoryModel,
    StepPrediction,
    activation_bytes_per_token,
    alpha_beta,
    family_seconds,
)
from kernels.linear_ce import workspace_bytes

__all__ = ["StepPredictor", "complete_ceilings", "datasheet_models", "default_models",
           "fits_in_memory", "prior_models"]

_FAMILIES = ("gemm", "attention", "norm", "loss")
_DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP / replicate's default gradient bucket
# Bytes one token keeps for backward in one decoder block on GPUs, per unit of the hidden
# width (never split by tp) and of the q, kv and ffn widths (split by tp): counted with
# saved-tensor hooks on the reference block for each way the trainer runs bf16 (FSDP2's
# mixed precision; autocast over fp32 parameters when dp = 1) and for fp32. The norms keep
# float32 statistics and inputs, rotary embeddings a float32 copy of q and k.
_SAVED_PER_TOKEN = {"mixed": (16, 4, 4, 8), "autocast": (22, 4, 4, 8), "fp32": (20, 8, 8, 16)}


def _loss_chunk(rc: RunConfig) -> int | None:
    """Tokens per chunk of the fused loss; None for the full loss (all logits at once)."""
    if rc.kernels.loss != "fused":
        return None
    from kernels.tuned import DEFAULTS

    return rc.kernels.configs.get("linear_ce", DEFAULTS["linear_ce"])["chunk_tokens"]


def _heaviest_steps(plans: _Plans) -> Iterator[tuple[int, int, np.ndarray]]:
    """(step, rank, unit rows) of each data-parallel rank's heaviest priced step, as
    ``autotune measure`` would meet its peak; ranks without work are skipped."""
    for r in range(len(plans.steps[0])):
        s = max(range(len(plans.steps)), key=lambda i: (plans.longest[i, r], plans.padded[i, r]))
        if len(plans.units[s][r]):
            yield s, r, plans.units[s][r]


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

    @classmethod
    def of(cls, rc: RunConfig) -> PlanKey:
        wl = rc.workload
        return cls(wl.model.model_dump_json(), wl.data.model_dump_json(),
                   wl.budget.global_batch_tokens, rc.schedule.model_dump_json(), rc.parallel.dp,
                   rc.seed)


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


@dataclass
class _Plans:
    """One workload + schedule + dp: the sampled steps' plans per data-parallel rank."""

    steps: list[list[StepPlan]]  # [step][dp rank]
    real_tokens: np.ndarray  # per step, all ranks
    units: list[list[np.ndarray]]  # [step][rank] -> unit rows (see _unit_rows)
    padded: np.ndarray  # [step, rank] padded tokens
    micro_batches: np.ndarray  # [step, rank]
    longest: np.ndarray  # [step, rank] longest real segment
    entries: list | None = None  # [step][rank] -> (signature ids, forward-again flags)


def _unit_rows(plan: StepPlan) -> np.ndarray:
    """Per unit of work (a micro-batch, or a ChunkFlow group): tokens that keep activations,
    their attention pairs, the tokens one recompute rematerializes, the key/value prefix,
    and the tokens of the widest logits."""
    out = []
    for unit in plan.units:
        if isinstance(unit, ChunkGroup):
            kept = unit.chunks[len(unit.chunks) - unit.keep:]
            widest = max(c.tokens for c in unit.chunks)
            kept_tokens = sum(c.tokens for c in kept)
            pairs = sum(c.attention_pairs for c in kept)
            prefix = sum(c.segments[0].length for c in unit.chunks[:-1])
            out.append((max(kept_tokens, widest), pairs, widest, prefix, widest))
        else:
            out.append((unit.tokens, unit.attention_pairs, unit.tokens, 0, unit.tokens))
    return np.array(out, dtype=float).reshape(-1, 5)


@dataclass(frozen=True)
class _Step:
    """The slowest replica's mean step, as the communication rules need it."""

    compute_s: float  # forward, backward and recomputation of all micro-batches
    forward_s: float  # of which forwards (recomputed ones included)
    micro_batches: float
    padded_tokens: float
    layers: int  # on this pipeline stage
    ckpt: int  # checkpointed layers on this stage
    act_bytes: int

    @property
    def per_micro_batch_s(self) -> float:
        return self.compute_s / max(self.micro_batches, 1.0)

    @property
    def tokens_per_micro_batch(self) -> float:
        return self.padded_tokens / max(self.micro_batches, 1.0)


@dataclass
class Comm:
    """A step's communication: seconds each kind takes in all (``*_s``), what of it the
    step waits for (``exposed_s``) and the pipeline bubble."""

    tp_s: float = 0.0
    dp_s: float = 0.0
    pp_s: float = 0.0
    exposed_s: float = 0.0
    bubble_s: float = 0.0
    dp_exposed_s: float = 0.0
    copies_s: float = 0.0  # FSDP's copies into and out of its collective buffers

    def breakdown(self) -> dict[str, float]:
        """The parts the step waits for (they add up with compute to the step)."""
        out = {"comm_tp": self.tp_s, "comm_dp": self.dp_exposed_s, "comm_pp": self.pp_s,
               "bubble": self.bubble_s}
        return out | ({"fsdp_copies": self.copies_s} if self.copies_s else {})

    @property
    def overlapped_s(self) -> float:
        """Data-parallel communication hidden behind compute."""
        return self.dp_s - self.dp_exposed_s


class _Collectives:
    """One collective call's seconds on GPUs: the collective profile's alpha-beta fit where
    it has one for the collective (scaled to the group size), else the collective prior of
    cited nccl-tests figures, else nominal figures (labelled so)."""

    def __init__(self, predictor: StepPredictor, device: str) -> None:
        self.predictor, self.device = predictor, device
        self.prior = predictor.models.collective_prior
        fits = predictor.models.collective_fits
        self.profiled = set() if fits is None or not len(fits) else set(fits.collective)

    def seconds(self, collective: str, nbytes: float, group: Group) -> float:
        if group.ranks <= 1:
            return 0.0
        if collective in self.profiled or self.prior is None:
            a, b, _ = self.predictor._alpha_beta(collective, group.ranks, self.device)
            return a + nbytes * b
        return float(self.prior.seconds(collective, nbytes, group))

    def source(self, group: Group) -> str:
        where = f"{group.ranks} ranks, {group.per_node} per node"
        if self.profiled:
            return f"collective profile ({', '.join(sorted(self.profiled))}), {where}"
        if self.prior is None:
            return f"nominal figures, {where}"
        return f"collective prior ({self.prior.device}, {where}): {self.prior.source}"


def mesh_groups(rc: RunConfig) -> dict[str, Group]:
    """The tp, dp and pp groups as the trainer's (pp, dp, tp) mesh lays ranks on nodes:
    tp innermost (consecutive ranks), then dp, then pp."""
    p, per_node = rc.parallel, rc.workload.hardware.devices_per_node

    def group(size: int, stride: int) -> Group:
        if size <= 1:
            return Group(1, 1)
        return Group(size, max(1, min(size, per_node // stride)) if stride < per_node else 1)

    return {"tp": group(p.tp, 1), "dp": group(p.dp, p.tp), "pp": group(p.pp, p.tp * p.dp)}


class StepPredictor:
    """``predict(rc)`` for one config, ``predict_many(rcs)`` for a batch (the search's
    path); ``warmup`` and ``steps`` pick the global batches priced, as ``autotune measure``
    would run them."""

    def __init__(self, models: StepModels, *, warmup: int = 1, steps: int = 3) -> None:
        self.models = models
        self.warmup, self.steps = warmup, steps
        self._data: dict[str, object] = {}
        self._plans: dict[PlanKey, _Plans] = {}
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

    def _plans_for(self, rc: RunConfig, key: PlanKey, dims: ModelDims) -> _Plans:
        if key in self._plans:
            return self._plans[key]
        data = self._lengths(rc, dims)
        timed = timed_plans(rc, data.lengths, dims, warmup=self.warmup, steps=self.steps)
        steps = [ranks for _, ranks in timed]
        real = [int(data.lengths[ids].sum()) for ids, _ in timed]
        units = [[_unit_rows(p) for p in ranks] for ranks in steps]
        padded = np.array([[sum(mb.tokens for mb in p.micro_batches()) for p in r] for r in steps], float)
        mbs = np.array([[sum(1 for _ in p.micro_batches()) for p in r] for r in steps], float)
        longest = np.array([[max((seg.length for mb in p.micro_batches() for seg in mb.segments),
                                 default=0) for p in r] for r in steps], float)
        self._plans[key] = out = _Plans(steps, np.array(real, float), units, padded, mbs, longest)
        return out

    def _entries(self, plans: _Plans) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per step and rank: each micro-batch's signature id, and whether its forward runs
        again whatever the checkpointing (a ChunkFlow chunk whose activations were dropped)."""
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

    def _compute_for(self, ckey: ComputeKey, plans: _Plans, dims: ModelDims) -> StageCompute:
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
                a = again.astype(float)[:, None]
                fam = layers * (fwd + bwd) + layers * a * fwd
                out.family_base[s, r] = fam.sum(0)
                out.family_base[s, r, _FAMILIES.index("loss")] += (lf * (1 + a[:, 0]) + lb).sum()
                out.family_ckpt[s, r] = ((1 - a) * fwd).sum(0)
                out.forward_base[s, r] = ((layers * (1 + a) * fwd).sum() + (lf * (1 + a[:, 0])).sum())
                out.forward_ckpt[s, r] = ((1 - a) * fwd).sum()
                out.runs_base[s, r] = (layers * (rf + rb) + layers * a[:, 0] * rf + 2 + a[:, 0]).sum()
                out.runs_ckpt[s, r] = ((1 - a[:, 0]) * rf).sum()
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

    def _compose_one(self, rc: RunConfig, dims: ModelDims, plans: _Plans,
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
        act_bytes = 2 if rc.precision.dtype == "bf16" else 4
        mbs = float(plans.micro_batches[steps, slow].mean())
        padded = float(plans.padded[steps, slow].mean())
        breakdown = {f: float(v) for f, v in zip(_FAMILIES, fam_s)} | {"optimizer": opt_s}
        step = _Step(compute_s, forward_s, mbs, padded, layers, ckpt, act_bytes)
        if dev == "cuda":
            comm, sources = self._gpu_comm(rc, dims, step)
        else:
            comm, sources = self._measured_comm(rc, dims, step)
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
            return row, self._gpu_memory_units(rc, dims, plans, layers, ckpt)
        return row, self._memory_units(rc, dims, plans, layers, ckpt, act_bytes)

    def _measured_comm(self, rc: RunConfig, dims: ModelDims, st: _Step) -> tuple[Comm, dict]:
        """Communication from the collective profile's alpha-beta fits (or nominal figures),
        added to compute as the CPU backend runs it: gloo's collectives take the cores the
        compute would use, so nothing overlaps."""
        p, dev = rc.parallel, rc.workload.hardware.device
        mbs, padded, layers, ckpt = st.micro_batches, st.padded_tokens, st.layers, st.ckpt
        sources = {}
        # tensor parallel: two all-reduces of the block's output forward, two backward, per
        # layer and micro-batch; recomputed forwards repeat theirs
        a, b, sources["tp"] = self._alpha_beta("all_reduce", p.tp, dev)
        tp_calls = mbs * (4 * layers + 2 * ckpt)
        tp = tp_calls * a + padded * (4 * layers + 2 * ckpt) * dims.hidden * st.act_bytes * b
        shard_bytes = dims.total_params() // (p.tp * p.pp) * 4
        if p.zero_stage == 0:
            a, b, sources["dp"] = self._alpha_beta("all_reduce", p.dp, dev)
            dp = math.ceil(shard_bytes / _DDP_BUCKET_BYTES) * a + shard_bytes * b
        else:
            units = layers + 1  # one FSDP unit per block plus the root
            gathers = 1 if p.zero_stage < 3 else 2 * mbs
            ag = self._alpha_beta("all_gather", p.dp, dev)
            rs = self._alpha_beta("reduce_scatter", p.dp, dev)
            sources["dp"] = ag[2]
            dp = (gathers * (units * ag[0] + shard_bytes * ag[1])
                  + units * rs[0] + shard_bytes * rs[1])
        a, b, sources["pp"] = self._alpha_beta("send_recv", 2 if p.pp > 1 else 1, dev)
        pp = 2 * (mbs * a + padded * dims.hidden * st.act_bytes * b) if p.pp > 1 else 0.0
        bubble = st.compute_s * (p.pp - 1) / max(mbs, 1.0)
        return Comm(tp, dp, pp, tp + dp + pp, bubble, dp), sources

    def _gpu_comm(self, rc: RunConfig, dims: ModelDims, st: _Step) -> tuple[Comm, dict]:
        """Communication on GPUs (each collective from the collective profile where it has
        a fit, else the collective prior of cited figures), with what overlaps compute:
        NCCL runs on its own streams, so FSDP's all-gathers (prefetched one unit ahead) hide
        behind the previous unit's compute and its reduce-scatters behind the next unit's
        backward; DDP's bucketed all-reduce behind the last micro-batch's backward; the
        step waits for the first gather and the last reduction. Tensor-parallel all-reduces
        sit between the matmuls that need them (on the critical path); pipeline sends and
        the bubble ((pp - 1) micro-batch times for GPipe and 1F1B) too."""
        p = rc.parallel
        prior = _Collectives(self, rc.workload.hardware.device)
        g = mesh_groups(rc)
        sources = {k: prior.source(g[k]) for k in ("tp", "dp", "pp") if g[k].ranks > 1}
        mbs, layers, ckpt = st.micro_batches, st.layers, st.ckpt
        mb_bytes = st.tokens_per_micro_batch * dims.hidden * st.act_bytes
        tp_call = prior.seconds("all_reduce", mb_bytes, g["tp"])
        tp = mbs * (4 * layers + 2 * ckpt) * tp_call
        # FSDP2: parameters gathered in the compute dtype, gradients reduced in float32
        gather_bytes = 2 if rc.precision.dtype == "bf16" else 4
        block = (dims.total_params() - dims.vocab * dims.hidden * (1 if dims.tie_embeddings else 2)
                 - dims.hidden) / dims.layers / p.tp
        root = (dims.total_params() - dims.layers * block * p.tp) / p.pp  # embedding, head, norm
        ag_block = prior.seconds("all_gather", block * gather_bytes, g["dp"])
        rs_block = prior.seconds("reduce_scatter", block * 4, g["dp"])
        ag_root = prior.seconds("all_gather", root * gather_bytes, g["dp"])
        rs_root = prior.seconds("reduce_scatter", root * 4, g["dp"])
        fwd_mb = st.forward_s / max(mbs, 1.0)
        bwd_mb = (st.compute_s - st.forward_s) / max(mbs, 1.0)
        per_step = p.reduce_per_step(rc.schedule.policy)
        if g["dp"].ranks <= 1:
            dp = exposed_dp = 0.0
        elif p.zero_stage == 0:
            params = dims.total_params() / (p.tp * p.pp)
            buckets = max(1, math.ceil(params * 4 / _DDP_BUCKET_BYTES))
            per_bucket = prior.seconds("all_reduce", params * 4 / buckets, g["dp"])
            dp = buckets * per_bucket
            exposed_dp = max(per_bucket, dp - bwd_mb)
        else:
            reduce = layers * rs_block + rs_root
            gather = layers * ag_block + ag_root
            gathers = 2 * mbs if p.zero_stage == 3 else 1.0  # forward and backward, per micro-batch
            reductions = 1.0 if per_step else mbs
            dp = gathers * gather + reductions * reduce
            # each gather waits only for what its unit's compute cannot cover
            fwd_exposed = ag_root + max(0.0, layers * ag_block - fwd_mb)
            bwd_exposed = max(0.0, (layers * ag_block if p.zero_stage == 3 else 0.0)
                              + (0.0 if per_step else reduce) - bwd_mb)
            if p.zero_stage == 3:
                exposed_dp = mbs * (fwd_exposed + bwd_exposed)
            else:
                exposed_dp = fwd_exposed + (mbs * bwd_exposed if not per_step else 0.0)
            last = rs_root + rs_block  # the last units' reduction has no compute after it
            if per_step:
                last = max(last, reduce - bwd_mb)
            exposed_dp += last
        pp_call = prior.seconds("send_recv", mb_bytes, Group(2, 2 if g["pp"].per_node > 1 else 1))
        pp = 2 * mbs * pp_call if p.pp > 1 else 0.0
        bubble = st.per_micro_batch_s * (p.pp - 1)
        copies = 0.0
        if g["dp"].ranks > 1 and p.zero_stage > 0 and self.models.op_prior is not None:
            # FSDP2 copies each gathered unit out of the all-gather buffer (read and write
            # in the compute dtype) and each unit's gradients into the reduce-scatter buffer
            # (read in the compute dtype, written in float32): memory-bound kernels on the
            # compute stream
            stage = layers * block + root
            moved = (gathers * stage * 2 * gather_bytes
                     + reductions * stage * (gather_bytes + 4))
            copies = float(self.models.op_prior.seconds(
                pd.DataFrame({"bytes": [moved]}), "copy")[0])
        return Comm(tp, dp, pp, tp + exposed_dp + pp, bubble, exposed_dp, copies), sources

    @staticmethod
    def _sharing(rc: RunConfig) -> float:
        """How many ranks share one host's cores (CPU runs: torchrun gives each rank one
        thread of its own, where the profile's ops had the whole host)."""
        if rc.workload.hardware.device != "cpu":
            return 1.0
        return float(min(rc.parallel.world_size, rc.workload.hardware.devices_per_node))

    @staticmethod
    def _memory_units(rc: RunConfig, dims: ModelDims, plans: _Plans, layers: int, ckpt: int,
                      act_bytes: int) -> np.ndarray:
        """Memory features of every unit in the steps ``autotune measure`` would replay for
        the peak (each rank's heaviest timed step), bytes by the analytic count."""
        p = rc.parallel
        tp = p.tp
        q, kv, ffn = dims.q_width // tp, dims.kv_width // tp, dims.ffn // tp
        per_token_layer = activation_bytes_per_token(dims.hidden, q, kv, ffn, act_bytes)
        params = dims.total_params() // (tp * p.pp)
        if p.zero_stage == 0:
            state, gathered = params * 4 * 4, 0.0
        else:
            state = params * 4 * 4 / p.dp
            gathered = params * 4 if p.zero_stage < 3 else params * 4 * 2 / max(layers, 1)
        loss_chunk = _loss_chunk(rc)
        out = []
        for _, _, u in _heaviest_steps(plans):
            act_t, pairs, widest, prefix, logit_t = u.T
            ones = np.ones(len(u))
            # The loss's workspace scaled so that full logits count T x V x 8 bytes as ever
            # (logits and their gradient; the fit's coefficient covers the rest), and the
            # fused loss its chunk and gradients on the same scale.
            logits = workspace_bytes(logit_t, dims.hidden, dims.vocab, loss_chunk, act_bytes) * 2 / 3
            out.append(np.column_stack([
                state * ones, gathered * ones,
                act_t * (layers - ckpt) * per_token_layer,
                act_t * ckpt * dims.hidden * act_bytes,
                widest * per_token_layer * (1.0 if ckpt else 0.0),
                pairs * (dims.heads // tp) * (layers - ckpt + (1 if ckpt else 0)) * act_bytes,
                prefix * layers * 2 * kv * act_bytes,
                logits,
            ]))
        return np.vstack(out) if out else np.zeros((1, len(MEMORY_FEATURES)))

    @staticmethod
    def _gpu_memory_units(rc: RunConfig, dims: ModelDims, plans: _Plans, layers: int,
                          ckpt: int) -> np.ndarray:
        """The memory features of GPU configs, counted as the trainer holds them on GPUs
        (and as ``autotune memory`` traces them): FSDP2's mixed precision where dp > 1 under
        bf16 (fp32 master shards, bf16 gathered parameters), autocast over fp32 parameters
        where dp = 1; the lm head and embedding never split by tp; FlashAttention keeps no
        score matrices. With pp > 1, one row per unit for the first stage (the embedding,
        1F1B's pp micro-batches in flight, GPipe's all) and for the last (the head and the
        logits), so the peak is the worse stage's."""
        p = rc.parallel
        tp, h = p.tp, dims.hidden
        mode = "fp32" if rc.precision.dtype != "bf16" else ("mixed" if p.dp > 1 else "autocast")
        ch, cq, ckv, cf = _SAVED_PER_TOKEN[mode]
        per_token = ch * h + (cq * dims.q_width + ckv * dims.kv_width + cf * dims.ffn) / tp
        residual = 2 if mode == "mixed" else 4  # a checkpointed layer's saved input
        compute_bytes = 4 if mode == "fp32" else 2  # gathered parameters, K/V state
        # outside the blocks: the embedding, the lm head (unless tied) and the final norm
        embed = dims.vocab * h
        head = 0 if dims.tie_embeddings else embed
        block = (dims.total_params() - embed - head - h) / dims.layers / tp
        last = head + h if p.pp > 1 else embed + head + h
        # (parameters this stage holds beyond its blocks, whether it computes the loss)
        stages = [(last, True)] if p.pp == 1 else [(embed, False), (last, True)]
        loss_chunk = _loss_chunk(rc)
        sharded = p.zero_stage >= 1 and p.dp > 1
        per_step = p.dp > 1 and p.reduce_per_step(rc.schedule.policy)
        out = []
        for s, r, u in _heaviest_steps(plans):
            act_t, pairs, widest, prefix, logit_t = u.T
            n_mb = float(plans.micro_batches[s, r])
            for extra, has_loss in stages:
                local = layers * block + extra
                state = 16.0 * local / (p.dp if sharded else 1)
                if mode == "autocast":  # bf16 copies of the weights, kept for backward
                    gathered = 2.0 * local
                elif p.dp == 1:
                    gathered = 0.0
                elif p.zero_stage == 3:  # the root's parameters and one block in flight
                    gathered = compute_bytes * (extra + block)
                elif mode == "mixed" or p.zero_stage in (1, 2):  # bf16 copies, or unsharded
                    gathered = compute_bytes * local
                else:
                    gathered = 0.0
                if per_step:  # gradients accumulated unsharded (fp32) until the step's sync
                    gathered += 4.0 * local
                if p.pp == 1 or has_loss:
                    flight = 1.0
                else:
                    flight = n_mb if p.pp_schedule == "gpipe" else min(float(p.pp), n_mb)
                logits = (workspace_bytes(logit_t, h, dims.vocab, loss_chunk, compute_bytes) * 2 / 3
                          if has_loss else np.zeros(len(u)))
                ones = np.ones(len(u))
                # torch's pipeline stage keeps a receive buffer and an input gradient (or an
                # output and its gradient) of every micro-batch of the step: tokens x
                # hidden, counted with the checkpointed inputs
                buffers = n_mb * act_t * h * 4.0 if p.pp > 1 else 0.0
                out.append(np.column_stack([
                    state * ones, gathered * ones,
                    flight * act_t * (layers - ckpt) * per_token,
                    flight * act_t * ckpt * h * residual + buffers,
                    widest * per_token * (1.0 if ckpt else 0.0),
                    pairs * (dims.heads // tp) * (layers - ckpt + (1 if ckpt else 0)) * compute_bytes
                    * (1.0 if rc.kernels.attention == "eager" else 0.0),
                    prefix * layers * 2 * (dims.kv_width // tp) * compute_bytes,
                    logits,
                ]))
        return np.vstack(out) if out else np.zeros((1, len(MEMORY_FEATURES)))

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
            other = StepPredictor(alt, warmup=self.warmup, steps=self.steps)
            # the plans and signatures do not depend on the prices
            other._data, other._plans, other._sigs, other._rows = (self._data, self._plans,
                                                                   self._sigs, self._rows)
            row = other.predict_many([rc]).iloc[0]
            out[f"step_time_s_{q}"] = float(row["step_time_s"])
        out["tokens_per_s_low"] = float(row["tokens_per_step"]) / out["step_time_s_high"]
        out["tokens_per_s_high"] = float(row["tokens_per_step"]) / out["step_time_s_low"]
        return out


def fits_in_memory(models: StepModels, *, margin: float):  # noqa: ANN201 - Fits
    """A memory check for ``autotune.portfolio``: whether a config's predicted peak stays
    ``margin`` below its workload's memory cap."""
    from autotune.search import memory_limit

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
