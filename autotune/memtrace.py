"""Peak memory per rank of a RunConfig at real scale, traced on this machine (``autotune memory``).

The reference trainer builds, shards and steps the config as one rank of its whole world
under ``FakeTensorMode`` on torch's fake process group (``fake_parallel``): every tensor has
its real shape, dtype and sharding, and none holds memory. Torch's own trackers
(``torch.distributed._tools``) follow every tensor storage alive meanwhile and name what it
is: ``FSDPMemTracker`` where the model is FSDP2-wrapped (dp > 1, ``fully_shard`` for ZeRO
1-3 and ``replicate`` for ZeRO 0, which FSDP2 implements with the same machinery), and
``MemTracker`` otherwise (dp = 1, plain or tensor-parallel parameters).

What is traced, and why it gives the step's peak:

- The global batches ``autotune measure`` times (three by default): the trainer's stream
  after its warm-up steps; the heaviest work of any of them is traced. A warm-up step of the
  trainer's own on two-token passes leaves what a timed step finds: AdamW's moments and
  FSDP's lazily built state.
- Without pipelines a rank runs its units (micro-batches, or ChunkFlow's chunk groups) one
  after another, and everything a unit saves for backward is freed by its backward. What
  outlives a unit is the same whichever unit ran: parameters (ZeRO 1/2 keep them
  gathered across the step under ``grad_reduce: step``), gradients (sharded, or
  accumulated unsharded until the step's sync pass) and optimizer state. So the step's
  peak is the peak of its heaviest unit, run after one two-token pass that leaves
  gradients and gathered parameters as any other unit would (also when the heaviest runs
  first in the real step: it could as well run last, and the figure is an upper bound by
  the gradients), followed by the trainer's gradient reduction, clipping and optimizer
  step. The heaviest unit is the one with most tokens (activations and FlashAttention's
  saved state grow with tokens); under ``eager`` attention, which keeps score matrices,
  the one with most attention pairs is traced too; a ChunkFlow group (its key/value
  state grows with its sequence) and the heaviest plain micro-batch are both traced when
  a plan has both. The largest of these peaks is reported.
- Pipelines are the exception: a stage holds the activations of every micro-batch in
  flight, and more grows with the step's micro-batch count n: torch's ``PipelineStage``
  allocates receive buffers (activations in, gradients back) for all n when its schedule
  is built, keeps each input's gradient, and on the last stage each micro-batch's output
  (its summed loss, one number: the trainer keeps logits off that list), until the next
  step. So a stage runs the trainer's own schedule (``torch.distributed.pipelining``,
  through ``PipelineRunner``): over all n micro-batches where that is cheap, else over
  the k, k+1 and k+2 heaviest (1F1B: k = pp + 1, the most it keeps in flight plus one,
  so every stage reaches its steady state with gradients present; GPipe keeps all in
  flight: k = 2). All are padded to one width, so under FlashAttention each micro-batch
  adds the same bytes up to its segment boundaries: the two steps must agree within 1%
  and the larger extends the third peak to n (an upper bound, 0.1% above the whole trace
  on a tiny model, less at real size). Under kernels whose saved state depends on
  segments every micro-batch is traced. The schedule's warm-up vote reads a tensor back
  (``.item()``), which a fake tensor cannot answer; inside the tracer each stage takes
  the vote's outcome instead, static shapes, which every stage of the trainer declares
  (``PipelineRunner``), so all vote alike.

Each traced rank runs in a process of its own: a fresh RSS figure, and no DTensor state left
over from another rank's mesh coordinates. By default the traced rank is the first of the
data-parallel replica with the heaviest work (``heaviest_rank``): ranks differ by the
sequences they are dealt. With pp > 1 that replica's first rank of every stage is traced
besides the requested rank.

Fake tensors live on the CPU, so the CUDA caching allocator's 512-byte rounding per block is
not applied (well under a megabyte at these sizes), nor its fragmentation: the figure is the
peak of live tensor bytes, as ``torch.cuda.max_memory_allocated`` counts them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed._tools.mem_tracker import MemTracker

from autotune.config import RunConfig
from autotune.data import ChunkGroup, MicroBatch, StepPlan, Unit
from autotune.errors import UserError
from profilers.records import Measurement

__all__ = ["BREAKDOWN_KEYS", "MemoryTrace", "RankMemory", "TraceFailed", "confirm_fits",
           "first_rank_of_stage", "heaviest_rank", "trace_memory", "trace_rank", "untraceable"]

# Categories of the breakdown, in print order: torch's trackers' reference types under
# stable names, and the pipeline term counted beside them.
BREAKDOWN_KEYS = (
    "parameters", "unsharded_parameters", "gradients", "unsharded_gradients", "optimizer_state",
    "activations", "temporaries", "all_gather_buffers", "reduce_scatter_buffers", "buffers",
    "inputs", "other",
)
_CATEGORY = {
    "Parameter": "parameters", "Sharded Param": "parameters",
    "Unsharded Param": "unsharded_parameters", "Gradient": "gradients",
    "Sharded Grad": "gradients", "Unsharded Grad": "unsharded_gradients",
    "Optstate": "optimizer_state", "OptState": "optimizer_state", "Activation": "activations",
    "Temp": "temporaries", "All Gather": "all_gather_buffers",
    "Reduce Scatter": "reduce_scatter_buffers", "Buffer": "buffers", "Inputs": "inputs",
    "Other": "other",
}
# Attention kernels whose memory grows with attention pairs, not only tokens.
_SCORE_KERNELS = frozenset({"eager"})
# Attention kernels whose saved state has one size per token width, whatever the segments
# (FlashAttention's output and log-sum-exp): the pipeline extension needs that.
_WIDTH_KERNELS = frozenset({"varlen"})
TIMEOUT_S = 3600.0


class TraceFailed(RuntimeError):
    """A traced rank died without a result (a crash, a timeout): the work failed (exit 1)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankMemory:
    """The traced peak of one rank."""

    rank: int
    stage: int  # pipeline stage
    peak_bytes: int
    breakdown: dict[str, int]  # bytes per category at the peak (BREAKDOWN_KEYS)
    seconds: float  # build and trace, in the rank's process
    traced: str  # what ran under the tracker, in words
    tracker: str  # FSDPMemTracker or MemTracker
    global_batch: int  # index in the trainer's stream of global batches
    rss_bytes: int | None = None  # peak RSS of the rank's process, when run in one

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryTrace:
    """``autotune memory``'s answer: the requested rank, and every stage under pipelines."""

    config: str
    world: int
    seconds: float  # the whole command, every traced rank's process included
    rank: RankMemory
    stages: list[RankMemory] = field(default_factory=list)  # pp > 1: first rank of each stage

    @property
    def peak_bytes(self) -> int:
        """The config's peak: the worst rank traced."""
        return max([self.rank.peak_bytes] + [s.peak_bytes for s in self.stages])

    def to_json_dict(self) -> dict[str, Any]:
        r = self.rank
        out: dict[str, Any] = {
            "config": self.config, "peak_bytes": r.peak_bytes, "breakdown": r.breakdown,
            "world": self.world, "rank": r.rank, "stage": r.stage, "seconds": self.seconds,
            "tracker": r.tracker, "traced": r.traced, "global_batch": r.global_batch,
            "rss_bytes": r.rss_bytes}
        if self.stages:
            out["stages"] = [s.to_json_dict() for s in self.stages]
        return out


def untraceable(rc: RunConfig) -> str | None:
    """Why ``rc`` cannot be traced under fake tensors, in one line, or None."""
    if rc.compile == "blocks":
        return ("compile=blocks cannot be traced: torch.compile inside FakeTensorMode crashes "
                "the process (torch 2.13); trace the eager step with compile none")
    attn = rc.kernels.attention
    if attn in ("triton", "flex"):
        why = ("its Triton kernels need CUDA tensors" if attn == "triton"
               else "FlexAttention has no backward on the CPU")
        return (f"kernels.attention={attn} cannot be traced: fake tensors live on the CPU and "
                f"{why}; trace with varlen (the same memory as FlashAttention) or sdpa")
    if rc.kernels.loss == "fused":
        return ("kernels.loss=fused cannot be traced: it reads the count of labelled tokens "
                "back to the host (kernels/linear_ce.py), which a fake tensor cannot answer")
    if rc.checkpointing.policy == "adaptive":
        return ("checkpointing.policy=adaptive cannot be traced: it plans each micro-batch "
                "from what earlier micro-batches measured, which one traced unit never sees; "
                "trace a selective fraction instead")
    return None


def heaviest_rank(rc: RunConfig, *, warmup: int = 1, steps: int = 3) -> int:
    """The first rank (stage 0, tp 0) of the data-parallel replica with the heaviest work in
    the timed global batches: the most tokens in one unit, then in one step. Planned as the
    trainer plans (its seeded stream, its policy), from the lengths alone."""
    from autotune.data import load_lengths, timed_plans

    dims = rc.workload.model.resolve()
    lengths = load_lengths(rc.workload.data, dims).lengths
    load: dict[int, tuple[int, int]] = {}
    for _, plans in timed_plans(rc, lengths, dims, warmup=warmup, steps=steps):
        for r, plan in enumerate(plans):
            work = [_tokens(u) for u in plan.units]
            load[r] = max(load.get(r, (0, 0)), (max(work, default=0), sum(work)))
    replica = max(sorted(load), key=lambda r: load[r])
    return replica * rc.parallel.tp  # on the (pp, dp, tp) mesh


def first_rank_of_stage(rc: RunConfig, stage: int) -> int:
    """The rank at (stage, dp 0, tp 0) of the (pp, dp, tp) mesh."""
    return stage * rc.parallel.dp * rc.parallel.tp


def _stage_of(rc: RunConfig, rank: int) -> int:
    return rank // (rc.parallel.dp * rc.parallel.tp)


# ---- the driver: one process per traced rank ------------------------------------------------

def trace_memory(rc: RunConfig, *, rank: int | None = None, warmup: int = 1, steps: int = 3,
                 timeout_s: float = TIMEOUT_S) -> MemoryTrace:
    """Trace ``rank`` (by default the first rank of the data-parallel replica with the
    heaviest work, ``heaviest_rank``; with pp > 1 its replica's first rank of every stage
    too), each in a process of its own, at most as many at once as this machine has cores, over the ``steps``
    global batches after ``warmup`` (what ``autotune measure`` times). Raises UserError
    for a config that cannot be traced or built, TraceFailed when a rank's process dies.

    Example:
        >>> trace = trace_memory(load_yaml(RunConfig, "tuned.yaml"), rank=0)  # doctest: +SKIP
        >>> trace.rank.peak_bytes / 2**30  # doctest: +SKIP
        61.8
    """
    from autotune.config import save_yaml

    world = rc.parallel.world_size
    problem = untraceable(rc)
    if problem:
        raise UserError(problem)
    if rank is not None and not 0 <= rank < world:
        raise UserError(f"--rank {rank}: the config's world has {world} ranks (0-{world - 1})")
    t0 = time.perf_counter()
    p = rc.parallel
    if rank is None:
        rank = heaviest_rank(rc, warmup=warmup, steps=steps)
    replica = rank // p.tp % p.dp
    stage_ranks = [first_rank_of_stage(rc, s) + replica * p.tp for s in range(p.pp)]
    wanted = [rank] + [r for r in stage_ranks if r != rank] if rc.parallel.pp > 1 else [rank]
    with tempfile.TemporaryDirectory(prefix="autotune-memory-") as tmp:
        work = Path(tmp)
        save_yaml(rc, work / "config.yaml")
        with ThreadPoolExecutor(max_workers=max(1, min(len(wanted), os.cpu_count() or 1))) as pool:
            futures = {r: pool.submit(_trace_in_child, work, rank=r, warmup=warmup,
                                      steps=steps, timeout_s=timeout_s) for r in wanted}
            got = {r: f.result() for r, f in futures.items()}
    stages = [got[r] for r in stage_ranks] if rc.parallel.pp > 1 else []
    return MemoryTrace(config=rc.label(), world=world, seconds=time.perf_counter() - t0,
                       rank=got[rank], stages=stages)


def confirm_fits(rc: RunConfig, *, timeout_s: float = 900.0) -> Measurement | None:
    """Before a GPU trial runs: None when its peak traced at real size stays within the
    workload's memory cap, else the trial's result without running it, an OOM naming the
    traced peak. A config that cannot be traced (``untraceable``, or its trace fails) is
    left to the measurement, which records whatever happens."""
    from profilers.records import Status

    if rc.workload.hardware.device != "cuda" or untraceable(rc):
        return None
    try:
        trace = trace_memory(rc, timeout_s=timeout_s)
    except (UserError, TraceFailed):
        return None
    peak = trace.peak_bytes
    cap_gb = rc.workload.budget.memory_cap_gb
    if peak <= cap_gb * 2**30:
        return None
    return Measurement(status=Status.OOM, peak_mem_bytes=peak,
                       reason=f"not run: its peak traced at real size (autotune memory) is "
                              f"{size(peak)} per rank, over the memory cap of "
                              f"{size(int(cap_gb * 2**30))}", extra={"traced_peak_bytes": peak})


def size(n: int) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


def _trace_in_child(work: Path, *, rank: int, warmup: int, steps: int,
                    timeout_s: float) -> RankMemory:
    from profilers.isolation import run_isolated

    out, log = work / f"rank{rank}.json", work / f"rank{rank}.log"
    argv = [sys.executable, "-m", "autotune.memtrace", str(work / "config.yaml"),
            "--rank", str(rank), "--warmup", str(warmup), "--steps", str(steps),
            "--out", str(out)]
    run = run_isolated(argv, timeout_s=timeout_s, mem_cap_bytes=None, log_path=log)
    if not out.is_file():
        last = next((line for line in reversed(run.log_tail.splitlines()) if line.strip()), "")
        raise TraceFailed(f"tracing rank {rank} failed ({run.reason or run.status.value})"
                          + (f": {last.strip()}" if last else ""))
    payload = json.loads(out.read_text())
    if "error" in payload:
        raise UserError(payload["error"])
    return RankMemory(**payload["result"] | {"rss_bytes": run.peak_rss_bytes or None})


def main(argv: Sequence[str] | None = None) -> int:
    """One traced rank: ``python -m autotune.memtrace CONFIG --rank R --out FILE``. Writes
    ``{"result": ...}``, or ``{"error": ...}`` (exit 2) for a config that cannot be built."""
    from autotune.config import load_yaml
    from profilers.store import atomic_write_text

    p = argparse.ArgumentParser(prog="autotune.memtrace")
    p.add_argument("config")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--full-pipeline", action="store_true")
    args = p.parse_args(argv)
    rc = load_yaml(RunConfig, args.config)
    try:
        result = trace_rank(rc, rank=args.rank, warmup=args.warmup, steps=args.steps,
                            full_pipeline=args.full_pipeline)
        payload, code = {"result": result.to_json_dict()}, 0
    except UserError as exc:
        payload, code = {"error": str(exc)}, 2
    atomic_write_text(Path(args.out), json.dumps(payload))
    return code


# ---- one rank, in this process ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Run:
    """Units to step through under the tracker, and what they stand for."""

    units: list[Unit]
    what: str


@dataclass(frozen=True, slots=True)
class _Peak:
    bytes: int
    breakdown: dict[str, int]
    what: str
    tracker: str
    batch: int  # which timed global batch (0: the first after the warm-up steps)


def trace_rank(rc: RunConfig, *, rank: int = 0, warmup: int = 1, steps: int = 3,
               full_pipeline: bool = False) -> RankMemory:
    """This process as ``rank`` of ``rc``'s world under fake tensors: build, then trace the
    heaviest work of the ``steps`` global batches after ``warmup`` warm-up steps (see the
    module docstring).
    ``full_pipeline`` traces every micro-batch of a pipeline stage instead of extending three
    shorter runs (slow; it checks the extension). Leaves DTensor state behind that a later
    call for another rank must not meet: one call per process (``trace_memory`` does)."""
    from autotune.train.distributed import fake_parallel
    from autotune.train.trainer import Trainer

    problem = untraceable(rc)
    if problem:
        raise UserError(problem)
    t0 = time.perf_counter()
    # As init_parallel does for real runs: ChunkFlow's segment-0 keys and values are views.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    with fake_parallel(rc, rank=rank) as ctx:
        # What the trainer refuses as bad input (a tuning cache it cannot read) is a
        # UserError already; anything else it raises is a failure, not the user's input.
        trainer = Trainer(rc, ctx=ctx, time_compute=False)
        batches = _timed_batches(trainer, warmup=warmup, steps=steps)
        _warm_up(trainer, batches[0][0])
        top = max(_peaks(trainer, batches, full_pipeline=full_pipeline),
                  key=lambda p: p.bytes)
    return RankMemory(rank=rank, stage=_stage_of(rc, rank), peak_bytes=top.bytes,
                      breakdown=top.breakdown, seconds=time.perf_counter() - t0,
                      traced=f"global batch {warmup + top.batch}: {top.what}",
                      tracker=top.tracker, global_batch=warmup + top.batch)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()),
                type(exc).__name__)


def _timed_batches(trainer: Any, *, warmup: int, steps: int) -> list[tuple[np.ndarray, StepPlan]]:
    """The global batches ``autotune measure`` times (the stream after its warm-up steps),
    each with this rank's plan of it, padded as the trainer pads it."""
    for _ in range(warmup):
        next(trainer.batches)
    out = []
    for _ in range(steps):
        ids, plans, _ = trainer.next_plans()
        out.append((ids, plans[trainer.ctx.dp_rank]))
    return out


def _warm_up(trainer: Any, ids: np.ndarray) -> None:
    """A warm-up step of the trainer's own, on two-token passes (one per pipeline stage, the
    fewest 1F1B runs): it leaves what the measured step finds, AdamW's moments and FSDP's
    lazily initialized state (under fake tensors that includes re-padding uneven shards,
    which would otherwise be allocated inside the traced step)."""
    with _static_pipeline_vote():
        _step_on(trainer, ids, [MicroBatch(())] * trainer.ctx.pp)


# ---- what to run ---------------------------------------------------------------------------

def _peaks(trainer: Any, batches: list[tuple[np.ndarray, StepPlan]], *,
           full_pipeline: bool) -> list[_Peak]:
    if trainer.pipeline is not None:
        # The step with the widest micro-batch (pipelines pad all to one width), then the
        # most tokens: the stage's in-flight buffers grow with both.
        b = max(range(len(batches)), key=lambda i: (
            max((mb.tokens for mb in batches[i][1].micro_batches()), default=0),
            sum(mb.tokens for mb in batches[i][1].micro_batches())))
        return [_pipeline_peak(trainer, *batches[b], full=full_pipeline, batch=b)]
    real = [(b, i) for b, (_, plan) in enumerate(batches)
            for i, u in enumerate(plan.units) if _tokens(u)]
    if not real:  # a rank without sequences: its plans are padding passes, cheap to run whole
        ids, plan = batches[0]
        return [_trace(trainer, ids, _Run(list(plan.units), "no sequences on this rank"), 0)]
    picks = _heaviest([batches[b][1].units[i] for b, i in real],
                      scores=trainer.rc.kernels.attention in _SCORE_KERNELS)
    return [_trace(trainer, batches[b][0], _unit_run(batches[b][1], i), b)
            for b, i in (real[j] for j in picks)]


def _heaviest(units: list[Unit], *, scores: bool) -> list[int]:
    """Indices of the units (of any timed step) that may hold the peak (see the module
    docstring)."""
    groups = [i for i, u in enumerate(units) if isinstance(u, ChunkGroup)]
    micro = [i for i, u in enumerate(units) if not isinstance(u, ChunkGroup)]
    picks: list[int] = []
    if groups:  # the longest sequence's state first, then its kept chunks
        picks.append(max(groups, key=lambda i: (_tokens(units[i]), _kept(units[i]))))
    if micro:
        picks.append(max(micro, key=lambda i: (units[i].tokens, units[i].attention_pairs)))
        if scores:
            picks.append(max(micro, key=lambda i: (units[i].attention_pairs, units[i].tokens)))
    return list(dict.fromkeys(picks))


def _tokens(unit: Unit) -> int:
    return sum(c.tokens for c in unit.chunks) if isinstance(unit, ChunkGroup) else unit.tokens


def _kept(group: ChunkGroup) -> int:
    return sum(c.tokens for c in group.chunks[len(group.chunks) - group.keep:])


def _unit_run(plan: StepPlan, index: int) -> _Run:
    """The unit at ``index``, after a two-token pass standing in for the rank's other units
    of the step: what outlives a unit (gradients, accumulated unsharded gradients, gathered
    parameters) is there even when the heaviest unit runs first, since it could as well run
    last (an upper bound by the gradients when it is first). Alone only when it is the
    rank's one unit."""
    unit = plan.units[index]
    n_real = sum(1 for u in plan.units if _tokens(u))
    if isinstance(unit, ChunkGroup):
        desc = (f"ChunkFlow group of {len(unit.chunks)} chunks, {_tokens(unit):,} tokens "
                f"({unit.keep} kept)")
    else:
        desc = f"micro-batch of {unit.tokens:,} tokens in {len(unit.segments)} segments"
    what = f"unit {index + 1} of {n_real} on this rank, a {desc}"
    if len(plan.units) == 1:
        return _Run([unit], what)
    return _Run([MicroBatch(()), unit], what + ", after a two-token pass for the other units")


def _pipeline_peak(trainer: Any, ids: np.ndarray, plan: StepPlan, *, full: bool,
                   batch: int) -> _Peak:
    """The stage's peak over all ``n`` micro-batches of its plan: traced over the k, k+1
    and k+2 heaviest, k being the fewest whose schedule reaches its steady state with
    gradients present (1F1B: pp + 1, as many as it keeps in flight plus one; GPipe, which
    keeps all in flight: 2), and extended along the line they draw (``_extended``). Traced
    whole where that costs no more, where ``full`` asks, and under attention kernels whose
    saved state depends on the segments, not only the width."""
    mbs = list(plan.micro_batches()) or [MicroBatch(())]  # as PipelineRunner.run runs it
    n = len(mbs)
    k = 2 if trainer.rc.parallel.pp_schedule == "gpipe" else trainer.ctx.pp + 1
    whole = full or n <= k + 2 or trainer.rc.kernels.attention not in _WIDTH_KERNELS
    counts = [n] if whole else [k, k + 1, k + 2]
    # Heaviest first: most tokens, then most segments (boundary tensors), then pairs.
    order = sorted(range(n), key=lambda i: (mbs[i].tokens, len(mbs[i].segments),
                                            mbs[i].attention_pairs))
    sched = trainer.rc.parallel.pp_schedule
    peaks = [_trace(trainer, ids, _Run(
        [mbs[i] for i in sorted(order[n - c:])],
        f"the trainer's {sched} schedule over the {c} heaviest of {n} micro-batches "
        f"on this rank, all padded to one width"), batch) for c in counts]
    if len(peaks) == 1:
        return peaks[0]
    return _extended(peaks, counts=counts, n=n, schedule=sched)


def _extended(peaks: list[_Peak], *, counts: list[int], n: int, schedule: str) -> _Peak:
    """Three traced peaks over c, c+1 and c+2 micro-batches extended to ``n``. What each
    micro-batch adds (its inputs, recv buffers and input gradients, the last stage's kept
    output, its activations under GPipe) has the same shapes for all, as they share one
    width; only their segment boundaries (a few bytes per segment) differ. So the two steps
    must agree within 1%, else the stage is refused; the larger one, per category, extends
    the third peak (the lighter micro-batches left out add no more)."""
    a, b, c = (p.breakdown for p in peaks)
    one, two = sum(b.values()) - sum(a.values()), sum(c.values()) - sum(b.values())
    if abs(two - one) > 0.01 * max(abs(one), abs(two)):
        raise UserError(f"pipeline stage peaks over {counts[0]}, {counts[1]} and {counts[2]} "
                        f"micro-batches grow by {one:,} then {two:,} bytes, not by one step "
                        f"per micro-batch; cannot extend them to {n}")
    step = {key: max(b[key] - a[key], c[key] - b[key]) for key in c}
    more = n - counts[-1]
    breakdown = {key: c[key] + more * step[key] for key in c}
    what = (f"the trainer's {schedule} schedule over the {counts[0]}, {counts[1]} and "
            f"{counts[2]} heaviest of {n} micro-batches on this rank (one width), "
            f"{sum(step.values()):,} bytes more per micro-batch, extended to {n}")
    return _Peak(sum(breakdown.values()), breakdown, what, peaks[-1].tracker, peaks[-1].batch)


# ---- tracing --------------------------------------------------------------------------------

def _trace(trainer: Any, ids: np.ndarray, run: _Run, batch: int) -> _Peak:
    """The peak of one step of the trainer over ``run.units``."""
    tracker = _tracker(trainer)
    if trainer.pipeline is not None:
        # A schedule's stage allocates its buffers when it first runs: build it in here.
        trainer.pipeline._schedules.clear()
    with _root_calls_reset(trainer.model, tracker), _propagation_untracked(), \
            _static_pipeline_vote(), tracker:
        _step_on(trainer, ids, run.units)
    peak, breakdown = _peak(tracker)
    return _Peak(peak, breakdown, run.what, tracker.name, batch)


def _step_on(trainer: Any, ids: np.ndarray, units: list[Unit]) -> None:
    """The trainer's own step (its reduction, clipping and optimizer step) over ``units`` in
    place of this rank's plan: ``launch_step`` plans the batch itself, so its planner is
    replaced on the instance for this one call."""
    plans = [StepPlan(list(units)) for _ in range(trainer.ctx.dp)]
    trainer.next_plans = lambda batch_ids=None: (ids, plans, 0.0)
    try:
        _launch(trainer, ids)
    finally:
        del trainer.next_plans


def _launch(trainer: Any, ids: np.ndarray) -> None:
    """``launch_step``, with the step's refusals of the config as bad input, since the real
    run fails alike: a sharding the model's first forward cannot run (tp splitting ffn
    unevenly), fewer micro-batches than a 1F1B schedule has stages."""
    try:
        trainer.launch_step(ids)  # never .result(): a fake tensor has no value to read
    except (RuntimeError, ValueError) as exc:
        text = str(exc)
        if "Sharding propagation failed" in text:
            raise UserError(f"{trainer.rc.label()}: the model rejects its layout (tp="
                            f"{trainer.ctx.tp}, dp={trainer.ctx.dp}): {_first_line(exc)}") from None
        if "Number of microbatches" in text:
            raise UserError(f"{trainer.rc.label()}: the trainer cannot run this step: "
                            f"{' '.join(text.split())}") from None
        raise


def _tracker(trainer: Any) -> MemTracker:
    from torch.distributed.fsdp import FSDPModule

    if isinstance(trainer.model, FSDPModule):  # fully_shard, and replicate for ZeRO 0
        return _FSDPTracker(trainer.model, trainer.optimizer)
    tracker = _Tracker()
    tracker.track_external(trainer.model, trainer.optimizer)
    return tracker


def _peak(tracker: Any) -> tuple[int, dict[str, int]]:
    """Peak bytes, summed over devices (fake tensors are all on the CPU), by category."""
    breakdown = dict.fromkeys(BREAKDOWN_KEYS, 0)
    peak = 0
    for snap in tracker.get_tracker_snapshot("peak").values():
        for key, value in snap.items():
            if key == "Total":
                peak += value
            else:
                breakdown[_CATEGORY[key.value]] += value
    return peak, breakdown


# ---- the trackers, and what they must not see -----------------------------------------------

class _Propagation:
    depth = 0  # DTensor sharding propagations in progress


class _SkipsPropagation:
    """DTensor derives an op's output shape by running the op on global-shape stand-ins
    under the fake mode in force. Torch's trackers skip those ops by comparing fake modes,
    which only works when the tracked step itself runs outside that mode; here the whole step
    runs under it, and the stand-ins would count as memory (a fused AdamW step once looked
    like four unsharded copies of the model). Ops inside a propagation are not tracked."""

    name = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if _Propagation.depth:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)  # type: ignore[misc]

    def _update_peak_stats(self, peak_state: Any) -> None:
        # Only the global peak is read here (module-wise statistics are dropped before every
        # root forward); the base class also walks every module's statistics on every op,
        # a seventh of a traced step's time.
        for device, snap in self._curr_mem_snap.items():  # type: ignore[attr-defined]
            if self._peak_mem.get(device, 0) < snap["Total"]:  # type: ignore[attr-defined]
                self._peak_mem[device] = snap["Total"]  # type: ignore[attr-defined]
                self._peak_mem_snap[device] = dict(snap)  # type: ignore[attr-defined]


class _FSDPTracker(_SkipsPropagation, FSDPMemTracker):
    name = "FSDPMemTracker"

    def _fsdp_param_group_post_backward(self, fsdp_mod: Any, orig: Any) -> Any:
        """Also names FSDP2's float32 copies of unsharded gradients (accumulated across
        micro-batches without a reduction under bf16): made inside backward, the tracker
        would count them as temporaries for the whole step."""
        inner = super()._fsdp_param_group_post_backward(fsdp_mod, orig)

        @functools.wraps(orig)
        def tagged(*args: Any, **kwargs: Any) -> None:
            inner(*args, **kwargs)
            group = fsdp_mod._get_fsdp_state()._fsdp_param_group
            for param in group.fsdp_params if group else ():
                if param.unsharded_accumulated_grad is not None:
                    self._update_and_maybe_create_winfos(param.unsharded_accumulated_grad,
                                                         _FSDPRefType.UNSHARDED_GRAD)

        return tagged


class _Tracker(_SkipsPropagation, MemTracker):
    name = "MemTracker"


@contextlib.contextmanager
def _propagation_untracked() -> Iterator[None]:
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    @functools.wraps(original)
    def flagged(self: Any, op_schema: Any) -> Any:
        _Propagation.depth += 1
        try:
            return original(self, op_schema)
        finally:
            _Propagation.depth -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = flagged  # type: ignore[method-assign]
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _root_calls_reset(root: Any, tracker: Any) -> Iterator[None]:
    """Torch's trackers refuse a second forward of the root module (they take it for the
    next iteration), but one step calls it once per unit, chunk and pipeline micro-batch.
    Only the global peak is read here, so the module-wise statistics are dropped before each
    forward of the root; this hook is global and registered first, so it runs before the
    trackers' own."""
    def reset(module: Any, _args: Any) -> None:
        if module is root and not tracker._mod_tracker.is_bw:
            tracker.reset_mod_stats()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(reset)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _static_pipeline_vote() -> Iterator[None]:
    """Each stage takes the warm-up vote's outcome without the vote, whose result is read
    back with ``.item()``: static, the vote every stage of the trainer casts (each declares
    its input and output shapes). A stage that would vote otherwise is refused."""
    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining._utils import InferenceMode

    original = schedules._PipelineSchedule._warmup_p2p

    def decided(self: Any, stages: list[Any], has_backward: bool, p2p_done: bool) -> None:
        for stage in stages:
            if InferenceMode.needs_dynamic(stage._user_meta, has_backward):
                raise UserError(f"pipeline stage {stage.stage_index} has no static shapes; "
                                f"its schedule cannot be traced under fake tensors")
            stage._inference_mode = InferenceMode.STATIC

    schedules._PipelineSchedule._warmup_p2p = decided  # type: ignore[method-assign]
    try:
        yield
    finally:
        schedules._PipelineSchedule._warmup_p2p = original  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
