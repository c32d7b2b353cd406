"""A step's communication: which collectives each parallelism runs, over which groups of the
(pp, dp, tp) mesh, priced from the collective profile or the GPU prior, and what of it the
step waits for (overlap on GPUs; none on CPUs, where gloo takes the compute's cores)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from autotune.config import ModelDims, RunConfig
from cost_models.bundle import StepModels
from cost_models.gpu_prior import Group

__all__ = ["Collectives", "Comm", "StepShape", "gpu_comm", "measured_comm", "mesh_groups"]

_DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP / replicate's default gradient bucket
# (collective, ranks, device) -> (seconds per call, seconds per byte, where from)
AlphaBeta = Callable[[str, int, str], tuple[float, float, str]]


@dataclass(frozen=True)
class StepShape:
    """The slowest replica's mean step, as the communication rules need it."""

    compute_s: float  # forward, backward and recomputation of all micro-batches
    forward_s: float  # of which forwards (recomputed ones included)
    micro_batches: float
    padded_tokens: float
    layers: int  # on this pipeline stage
    ckpt: int  # checkpointed layers on this stage
    act_bytes: int
    cp_gathered: float = 0.0  # sharded tokens whose keys and values the cp group gathers
    cp_gathers: float = 0.0  # micro-batches that gather

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
    bubble_s: float = 0.0
    dp_exposed_s: float = 0.0
    copies_s: float = 0.0  # FSDP's copies into and out of its collective buffers
    cp_s: float = 0.0  # context parallelism's key/value gathers (and their reductions)

    @property
    def exposed_s(self) -> float:
        """Communication the step waits for."""
        return self.tp_s + self.dp_exposed_s + self.pp_s + self.cp_s

    def breakdown(self) -> dict[str, float]:
        """The parts the step waits for (they add up with compute to the step)."""
        out = {"comm_tp": self.tp_s, "comm_dp": self.dp_exposed_s, "comm_pp": self.pp_s,
               "bubble": self.bubble_s}
        return (out | ({"comm_cp": self.cp_s} if self.cp_s else {})
                | ({"fsdp_copies": self.copies_s} if self.copies_s else {}))

    @property
    def overlapped_s(self) -> float:
        """Data-parallel communication hidden behind compute."""
        return self.dp_s - self.dp_exposed_s


class Collectives:
    """One collective call's seconds on GPUs: the collective profile's alpha-beta fit where
    it has one for the collective (scaled to the group size), else the collective prior of
    cited nccl-tests figures, else nominal figures (labelled so)."""

    def __init__(self, models: StepModels, alpha_beta: AlphaBeta, device: str) -> None:
        self.alpha_beta, self.device = alpha_beta, device
        self.prior = models.collective_prior
        fits = models.collective_fits
        self.profiled = set() if fits is None or not len(fits) else set(fits.collective)

    def seconds(self, collective: str, nbytes: float, group: Group) -> float:
        if group.ranks <= 1:
            return 0.0
        if collective in self.profiled or self.prior is None:
            a, b, _ = self.alpha_beta(collective, group.ranks, self.device)
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
    """The tp, cp, data-parallel and pp groups as the trainer's (pp, dp, cp, tp) mesh lays
    ranks on nodes: tp innermost (consecutive ranks), then cp, dp, pp. Gradients reduce over
    dp x cp (``dp``): every rank of a cp group holds the same parameters."""
    p, per_node = rc.parallel, rc.workload.hardware.devices_per_node

    def group(size: int, stride: int) -> Group:
        if size <= 1:
            return Group(1, 1)
        return Group(size, max(1, min(size, per_node // stride)) if stride < per_node else 1)

    return {"tp": group(p.tp, 1), "cp": group(p.cp, p.tp), "dp": group(p.dp * p.cp, p.tp),
            "pp": group(p.pp, p.tp * p.cp * p.dp)}


def _cp_comm(seconds, rc: RunConfig, dims: ModelDims, st: StepShape, group: Group,  # noqa: ANN001
             backward: str) -> float:
    """The cp group's key/value all-gathers: one per layer and micro-batch that shards a
    sequence, forward and again for a recomputed layer, and their gradients' reduction in
    backward (``backward``: reduce_scatter, or all_reduce where the backend has none)."""
    if group.ranks <= 1 or not st.cp_gathers:
        return 0.0
    per_call = st.cp_gathered / st.cp_gathers * 2 * dims.kv_width / rc.parallel.tp * st.act_bytes
    gathers = st.cp_gathers * (st.layers + st.ckpt)
    return (gathers * seconds("all_gather", per_call, group)
            + st.cp_gathers * st.layers * seconds(backward, per_call, group))


def measured_comm(alpha_beta: AlphaBeta, rc: RunConfig, dims: ModelDims, st: StepShape
                  ) -> tuple[Comm, dict]:
    """Communication from the collective profile's alpha-beta fits (or nominal figures),
    added to compute as the CPU backend runs it: gloo's collectives take the cores the
    compute would use, so nothing overlaps."""
    p, dev = rc.parallel, rc.workload.hardware.device
    mbs, padded, layers, ckpt = st.micro_batches, st.padded_tokens, st.layers, st.ckpt
    sources = {}
    # tensor parallel: two all-reduces of the block's output forward, two backward, per
    # layer and micro-batch; recomputed forwards repeat theirs
    a, b, sources["tp"] = alpha_beta("all_reduce", p.tp, dev)
    tp_calls = mbs * (4 * layers + 2 * ckpt)
    tp = tp_calls * a + padded * (4 * layers + 2 * ckpt) * dims.hidden * st.act_bytes * b
    shard_bytes = dims.total_params() // (p.tp * p.pp) * 4
    if p.zero_stage == 0:
        a, b, sources["dp"] = alpha_beta("all_reduce", p.dp * p.cp, dev)
        dp = math.ceil(shard_bytes / _DDP_BUCKET_BYTES) * a + shard_bytes * b
    else:
        units = layers + 1  # one FSDP unit per block plus the root
        gathers = 1 if p.zero_stage < 3 else 2 * mbs
        ag = alpha_beta("all_gather", p.dp * p.cp, dev)
        rs = alpha_beta("reduce_scatter", p.dp * p.cp, dev)
        sources["dp"] = ag[2]
        dp = (gathers * (units * ag[0] + shard_bytes * ag[1])
              + units * rs[0] + shard_bytes * rs[1])
    a, b, sources["pp"] = alpha_beta("send_recv", 2 if p.pp > 1 else 1, dev)
    pp = 2 * (mbs * a + padded * dims.hidden * st.act_bytes * b) if p.pp > 1 else 0.0
    bubble = st.compute_s * (p.pp - 1) / max(mbs, 1.0)
    groups = mesh_groups(rc)

    def ab_seconds(collective: str, nbytes: float, group: Group) -> float:
        a, b, _ = alpha_beta(collective, group.ranks, dev)
        return a + nbytes * b

    cp = _cp_comm(ab_seconds, rc, dims, st, groups["cp"], "all_reduce")
    if cp:
        sources["cp"] = alpha_beta("all_gather", p.cp, dev)[2]
    return Comm(tp, dp, pp, bubble, dp, cp_s=cp), sources

def gpu_comm(models: StepModels, alpha_beta: AlphaBeta, rc: RunConfig, dims: ModelDims,
             st: StepShape) -> tuple[Comm, dict]:
    """Communication on GPUs (each collective from the collective profile where it has
    a fit, else the collective prior of cited figures), with what overlaps compute:
    NCCL runs on its own streams, so FSDP's all-gathers (prefetched one unit ahead) hide
    behind the previous unit's compute and its reduce-scatters behind the next unit's
    backward; DDP's bucketed all-reduce behind the last micro-batch's backward; the
    step waits for the first gather and the last reduction. Tensor-parallel all-reduces
    sit between the matmuls that need them (on the critical path); pipeline sends and
    the bubble ((pp - 1) micro-batch times for GPipe and 1F1B) too."""
    p = rc.parallel
    prior = Collectives(models, alpha_beta, rc.workload.hardware.device)
    g = mesh_groups(rc)
    sources = {k: prior.source(g[k]) for k in ("tp", "cp", "dp", "pp") if g[k].ranks > 1}
    mbs, layers, ckpt = st.micro_batches, st.layers, st.ckpt
    mb_bytes = st.tokens_per_micro_batch * dims.hidden * st.act_bytes
    tp_call = prior.seconds("all_reduce", mb_bytes, g["tp"])
    tp = mbs * (4 * layers + 2 * ckpt) * tp_call
    # FSDP2: parameters gathered in the compute dtype, gradients reduced in float32
    gather_bytes = rc.precision.itemsize
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
    if g["dp"].ranks > 1 and p.zero_stage > 0 and models.op_prior is not None:
        # FSDP2 copies each gathered unit out of the all-gather buffer (read and write
        # in the compute dtype) and each unit's gradients into the reduce-scatter buffer
        # (read in the compute dtype, written in float32): memory-bound kernels on the
        # compute stream
        stage = layers * block + root
        moved = (gathers * stage * 2 * gather_bytes
                 + reductions * stage * (gather_bytes + 4))
        copies = float(models.op_prior.seconds(
            pd.DataFrame({"bytes": [moved]}), "copy")[0])
    cp = _cp_comm(prior.seconds, rc, dims, st, g["cp"], "reduce_scatter")
    return Comm(tp, dp, pp, bubble, exposed_dp, copies, cp), sources
