"""Step profiling: a training step under ``torch.profiler``, its time split by cost family.

A few steps run under ``torch.profiler.profile`` with ``schedule(wait, warmup, active)``,
shapes and FLOPs recorded; the active steps are written by ``tensorboard_trace_handler`` (the
layout torch-tb-profiler reads: ``tensorboard --logdir`` on the folder above) and reduced to
a per-op table (``ops.parquet``) and a per-family summary (``families.md``, ``summary.json``).

Attribution. Every profiler event's *self* time (CPU self time; on CUDA also the self
device time of the kernels it launched) goes to exactly one family, or to none, so family
sums never count a parent and its children twice. An event's family is decided, in this
order, by:

1. its name, for communication: ``c10d``, ``gloo``, ``nccl``, ``record_param_comms`` ops
   are ``collective`` wherever they run (an all-reduce inside gradient clipping included);
2. the scope it runs in, innermost first:

   - ``autotune:attention`` (the varlen attention kernel call in the model) is ``attention``;
     ``autotune:loss`` (lm head and cross-entropy) is ``loss``; ``autotune:clip_grad`` and
     torch's own ``Optimizer.step#...`` / ``Optimizer.zero_grad#...`` are ``optimizer``;
   - a backward node (``MmBackward0`` ...) belongs where the forward op that created it
     belongs, found by autograd's sequence number: a forward op records the next sequence
     number (``sequence_nr``) when it starts, the node it creates takes that number, so the
     node's creator is the last op on its forward thread that recorded it. The lm head's
     ``MmBackward0`` is therefore ``loss`` and an attention kernel's gathers' backward is
     ``attention``. The engine's ``evaluate_function: X`` wrapper goes with its node X.
     Forward ops re-run inside a backward node (activation checkpointing) record a sequence
     number, backward ops do not: the recomputed ops are classified as forward ops;
   - an op inside another op goes with its outermost op (``aten::t`` and ``aten::mm`` inside
     ``aten::linear`` are ``gemm``), so a decomposition never moves cost between families;
3. the op's own name: ``gemm`` for matmuls, ``attention`` for the SDPA / flash kernels and
   the autograd Functions of ``kernels/attention.py``, ``loss`` for log-softmax and NLL,
   ``optimizer`` for ``_foreach_*`` and fused Adam kernels, ``norm`` for every other ``aten``
   op: norms, elementwise work, copies, embedding lookups (``profilers/families.py``), and
   ``AccumulateGrad`` (adding a micro-batch's gradient into ``.grad``: elementwise work
   outside the optimizer's step).

What is left is ``unattributed``: the measured step time (wall time of the active
``ProfilerStep#N`` events, summed) minus the attributed sum. On a CPU that is the Python
time between ops (the ``ProfilerStep`` events' own self time) plus events no rule names; on
CUDA it is also the time the device sat idle.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from profilers.families import FAMILIES
from profilers.isolation import run_isolated
from profilers.records import Status
from profilers.store import atomic_write_bytes, atomic_write_text

__all__ = [
    "OUTPUT_FILES", "StepTarget", "TraceOutcome", "attribute", "family_table", "name_family",
    "op_table", "profile_steps", "run_trace", "scope_family", "step_time_us", "summarize_events",
    "write_outputs",
]

UNATTRIBUTED = "unattributed"
# What a trace folder holds; an earlier trace's copies of these are replaced, nothing else is.
OUTPUT_FILES = ("*.pt.trace.json", "*.pt.trace.json.gz", "ops.parquet", "families.md",
                "summary.json", "log.txt")

_BACKWARD_FUNCTION = torch._C._profiler.RecordScope.BACKWARD_FUNCTION.value
_EVALUATE = "autograd::engine::evaluate_function: "
_PROFILER_STEP = "ProfilerStep"  # "ProfilerStep#N" in traces, "ProfilerStep*" in events()
_ACCUMULATE_GRAD = "torch::autograd::AccumulateGrad"

_SCOPES = {
    "autotune:attention": "attention",
    "autotune:loss": "loss",
    "autotune:clip_grad": "optimizer",
}
_SCOPE_PREFIXES = {"Optimizer.step#": "optimizer", "Optimizer.zero_grad#": "optimizer"}
_COLLECTIVE = re.compile(r"c10d|gloo|nccl|record_param_comms", re.IGNORECASE)
_GEMM = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
    "aten::linear", "aten::mv", "aten::addmv", "aten::dot", "aten::einsum", "aten::_scaled_mm",
    "aten::_int_mm",
})
_ATTENTION_PREFIXES = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_",
                       "aten::_flash_attention", "aten::_efficient_attention")
_LOSS = frozenset({
    "aten::cross_entropy_loss", "aten::log_softmax", "aten::_log_softmax",
    "aten::_log_softmax_backward_data", "aten::nll_loss", "aten::nll_loss_nd",
    "aten::nll_loss_forward", "aten::nll_loss_backward", "aten::nll_loss2d_forward",
    "aten::nll_loss2d_backward",
})
_OPTIMIZER_PREFIXES = ("aten::_foreach_", "aten::_fused_adam", "aten::_fused_sgd")


def _attention_functions() -> frozenset[str]:
    """Profiler names of the custom autograd Functions in ``kernels/attention.py``: the
    forward records the class name, its backward node the class name plus ``Backward``."""
    import kernels.attention as mod

    names = [obj.__name__ for obj in vars(mod).values()
             if isinstance(obj, type) and issubclass(obj, torch.autograd.Function)]
    return frozenset(names + [f"{n}Backward" for n in names])


_ATTENTION_FUNCTIONS = _attention_functions()


def scope_family(name: str) -> str | None:
    """The family a scope (``record_function`` range) gives to everything inside it."""
    if name in _SCOPES:
        return _SCOPES[name]
    for prefix, family in _SCOPE_PREFIXES.items():
        if name.startswith(prefix):
            return family
    return None


def name_family(name: str) -> str | None:
    """The family of an op by its name alone, None for names no rule covers (rule 3 of the
    module docstring, with collectives first)."""
    if _COLLECTIVE.search(name):
        return "collective"
    if name in _GEMM:
        return "gemm"
    if name.startswith(_ATTENTION_PREFIXES) or name in _ATTENTION_FUNCTIONS:
        return "attention"
    if name in _LOSS:
        return "loss"
    if name.startswith(_OPTIMIZER_PREFIXES):
        return "optimizer"
    if name.startswith("aten::") or name == _ACCUMULATE_GRAD:
        return "norm"
    return None


@dataclass(frozen=True, slots=True)
class _Verdict:
    family: str | None  # of the event's own self time
    context: str | None  # what its children inherit; None lets them be named by rule 3
    backward: bool  # the context comes from a backward node


class _Attributor:
    """Families of a profile's CPU events (see the module docstring), memoized per event."""

    def __init__(self, events: list[Any]):
        self._verdicts: dict[int, _Verdict] = {}
        # The last op on each thread to record sequence number s created node s.
        self._creators: dict[tuple[int, int], Any] = {}
        for e in sorted(events, key=lambda e: e.time_range.start):
            if e.sequence_nr >= 0 and e.scope != _BACKWARD_FUNCTION and not e.name.startswith(_EVALUATE):
                self._creators[(e.thread, e.sequence_nr)] = e

    def verdict(self, e: Any) -> _Verdict:
        v = self._verdicts.get(id(e))
        if v is None:
            v = self._decide(e)
            self._verdicts[id(e)] = v
        return v

    def _decide(self, e: Any) -> _Verdict:
        name = e.name
        if _COLLECTIVE.search(name):
            return _Verdict("collective", "collective", False)
        scope = scope_family(name)
        if scope is not None:
            return _Verdict(scope, scope, False)
        if name.startswith(_PROFILER_STEP):
            return _Verdict(None, None, False)
        if name.startswith(_EVALUATE):
            node = next((c for c in e.cpu_children if c.scope == _BACKWARD_FUNCTION), None)
            family = self.verdict(node).family if node is not None else None
            return _Verdict(family, family, True)
        if e.scope == _BACKWARD_FUNCTION:
            family = self._node_family(e)
            return _Verdict(family, family, True)
        parent = self.verdict(e.cpu_parent) if e.cpu_parent is not None else None
        # A forward op re-run under a backward node (checkpointing) is not part of that node.
        recomputed = parent is not None and parent.backward and e.sequence_nr >= 0
        if parent is not None and parent.context is not None and not recomputed:
            return parent
        family = name_family(name)
        return _Verdict(family, family, False)

    def _node_family(self, node: Any) -> str | None:
        if node.name == _ACCUMULATE_GRAD:
            return name_family(node.name)
        creator = self._creators.get((node.fwd_thread, node.sequence_nr))
        if creator is not None:
            return self.verdict(creator).family
        return name_family(node.name)


def _cpu_events(events: Iterable[Any]) -> list[Any]:
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and not e.is_async]


def attribute(events: Iterable[Any]) -> list[tuple[Any, str | None, bool]]:
    """(event, family or None, in a backward pass) for every CPU event of a profile."""
    cpu = _cpu_events(events)
    att = _Attributor(cpu)
    return [(e, (v := att.verdict(e)).family, v.backward) for e in cpu]


def step_time_us(events: Iterable[Any]) -> tuple[float, int]:
    """Summed wall time of the profiled steps (``ProfilerStep#N`` ranges) and their number."""
    steps = [e for e in _cpu_events(events) if e.name.startswith(_PROFILER_STEP)]
    return float(sum(e.time_range.elapsed_us() for e in steps)), len(steps)


def op_table(events: Iterable[Any]) -> pd.DataFrame:
    """One row per (family, op name, input shapes, backward): calls, self CPU and device
    time in microseconds, and FLOPs as the profiler counts them (summed over calls).
    ``backward`` marks work of a backward node; forward ops recomputed during backward
    (activation checkpointing) are not marked."""
    rows = [(family or UNATTRIBUTED, e.name, str(e.input_shapes or []), backward,
             e.self_cpu_time_total, e.self_device_time_total, e.flops or 0)
            for e, family, backward in attribute(events)]
    df = pd.DataFrame(rows, columns=["family", "name", "input_shapes", "backward", "self_cpu_us",
                                     "self_device_us", "flops"])
    out = (df.assign(count=1)
           .groupby(["family", "name", "input_shapes", "backward"], as_index=False, sort=False)
           .agg(count=("count", "sum"), self_cpu_us=("self_cpu_us", "sum"),
                self_device_us=("self_device_us", "sum"), flops=("flops", "sum")))
    out = out.astype({"count": "int64", "self_cpu_us": "float64", "self_device_us": "float64",
                      "flops": "int64"})
    return out.sort_values(["self_cpu_us", "self_device_us"], ascending=False, ignore_index=True)


def family_table(ops: pd.DataFrame, measured_us: float, *, basis: str) -> pd.DataFrame:
    """Per family (all of FAMILIES, in order) its self time in seconds and its fraction of
    the measured step time; last, ``unattributed`` = measured minus the attributed sum.

    ``basis`` is ``cpu`` (self CPU time) or ``device`` (self device time, on CUDA)."""
    if measured_us <= 0:
        raise ValueError(f"measured step time {measured_us} us: no profiled step in the trace")
    column = {"cpu": "self_cpu_us", "device": "self_device_us"}[basis]
    attributed = ops[ops["family"] != UNATTRIBUTED]
    per = attributed.groupby("family")[column].sum()
    calls = attributed.groupby("family")["count"].sum()
    rows = [(f, float(per.get(f, 0.0)) / 1e6, int(calls.get(f, 0))) for f in FAMILIES]
    rest = measured_us / 1e6 - sum(s for _, s, _ in rows)
    rows.append((UNATTRIBUTED, rest, int(ops.loc[ops["family"] == UNATTRIBUTED, "count"].sum())))
    table = pd.DataFrame(rows, columns=["family", "self_s", "ops"])
    table["fraction"] = table["self_s"] / (measured_us / 1e6)
    return table[["family", "self_s", "fraction", "ops"]]


def summarize_events(events: Any, *, device: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The op table, the family table and the headline figures of one profile."""
    measured_us, steps = step_time_us(events)
    basis = "device" if device == "cuda" else "cpu"
    ops = op_table(events)
    families = family_table(ops, measured_us, basis=basis)
    unattributed = float(families.loc[families["family"] == UNATTRIBUTED, "fraction"].iloc[0])
    head = {"steps": steps, "basis": basis, "measured_s": measured_us / 1e6,
            "step_time_s": measured_us / 1e6 / steps, "coverage": 1.0 - unattributed}
    return ops, families, head


# ---- capturing ----------------------------------------------------------------------------

@dataclass(frozen=True)
class StepTarget:
    """What a builder (``module:function`` taking a config path) hands the child: one
    training step to call repeatedly, the device kind it runs on, and a label."""

    step: Callable[[], object]
    device: str
    label: str


def profile_steps(step: Callable[[], object], *, device: str, out_dir: Path, wait: int = 1,
                  warmup: int = 1, active: int = 3) -> torch.profiler.profile:
    """Run ``step`` wait + warmup + active times under the profiler; the active steps'
    trace goes to ``out_dir`` as ``*.pt.trace.json``. Returns the finished profiler, whose
    ``events()`` are the active steps'."""
    if active < 1 or wait < 0 or warmup < 0:
        raise ValueError(f"wait={wait}, warmup={warmup}, active={active}: need active >= 1 and "
                         f"the others >= 0")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sched = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=sched, record_shapes=True,
                                with_flops=True,
                                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out_dir))
                                ) as prof:
        for _ in range(wait + warmup + active):
            step()
            if device == "cuda":
                # A step's ProfilerStep range must hold its kernels, not hand them to the next.
                torch.cuda.synchronize()
            prof.step()
    return prof


def _families_markdown(label: str, head: dict, families: pd.DataFrame, ops: pd.DataFrame) -> str:
    time_kind = "self device time" if head["basis"] == "device" else "self CPU time"
    lines = [f"# Step profile: {label}", "",
             f"{head['steps']} profiled steps, {head['measured_s']:.3f} s measured "
             f"({head['step_time_s']:.3f} s per step); families by {time_kind}; "
             f"coverage {head['coverage']:.1%}.", "",
             "| family | self s | fraction | ops |", "|---|---:|---:|---:|"]
    for r in families.itertuples():
        lines.append(f"| {r.family} | {r.self_s:.4f} | {r.fraction:.2%} | {r.ops} |")
    column = "self_device_us" if head["basis"] == "device" else "self_cpu_us"
    lines += ["", "## Heaviest ops per family", "", "| family | op | backward | calls | self s |",
              "|---|---|---|---:|---:|"]
    by_name = ops.groupby(["family", "name", "backward"], as_index=False)[[column, "count"]].sum()
    for family in (*FAMILIES, UNATTRIBUTED):
        for r in by_name[by_name["family"] == family].nlargest(3, column).itertuples():
            lines.append(f"| {family} | `{r.name}` | {'yes' if r.backward else 'no'} | "
                         f"{r.count} | {getattr(r, column) / 1e6:.4f} |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, *, label: str, device: str, events: Any) -> dict:
    """ops.parquet, families.md and summary.json for a finished profile; returns the summary."""
    ops, families, head = summarize_events(events, device=device)
    buf = ops.to_parquet(index=False)
    atomic_write_bytes(out_dir / "ops.parquet", buf)
    atomic_write_text(out_dir / "families.md", _families_markdown(label, head, families, ops))
    summary = {"label": label, "device": device, **head,
               "families": families.to_dict(orient="records"),
               "trace_files": sorted(p.name for p in out_dir.glob("*.pt.trace.json*"))}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


# ---- the isolated run ---------------------------------------------------------------------

@dataclass(frozen=True)
class TraceOutcome:
    """How a traced run ended; ``summary`` (summary.json) when it completed."""

    status: Status
    reason: str
    out_dir: Path
    summary: dict | None
    log_tail: str


def run_trace(builder: str, config: Path, out_dir: Path, *, wait: int = 1, warmup: int = 1,
              active: int = 3, timeout_s: float = 900.0, mem_cap_bytes: int | None = None
              ) -> TraceOutcome:
    """Trace in a child process (``python -m profilers.trace``) under a timeout and memory cap.

    The child writes into a fresh folder beside ``out_dir``, which replaces the outputs of
    an earlier trace there only once the child completed; a failed run leaves nothing.

    Args:
        builder: ``module:function`` that turns ``config`` into a StepTarget in the child.
        config: the config file the builder reads.
        out_dir: the trace folder; created, or its earlier trace outputs replaced.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    created = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    done = False
    try:
        # mkdtemp creates 0700; the folder it becomes should have the permissions mkdir gives.
        staging.chmod(0o777 & ~_umask())
        argv = [sys.executable, "-m", "profilers.trace", "--builder", builder, "--config",
                str(config), "--out", str(staging), "--wait", str(wait), "--warmup", str(warmup),
                "--active", str(active)]
        run = run_isolated(argv, timeout_s=timeout_s, mem_cap_bytes=mem_cap_bytes,
                           log_path=staging / "log.txt",
                           env={**os.environ, "PYTHONUNBUFFERED": "1"}, poll_s=0.2)
        summary_path = staging / "summary.json"
        if run.status is not Status.COMPLETE or not summary_path.is_file():
            reason = run.reason or "the child exited without writing summary.json"
            status = run.status if run.status is not Status.COMPLETE else Status.CRASHED
            return TraceOutcome(status, reason, out_dir, None, run.log_tail)
        summary = json.loads(summary_path.read_text())
        _move_into(staging, out_dir)
        done = True
        return TraceOutcome(Status.COMPLETE, "", out_dir, summary, run.log_tail)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created if not done else ():
            with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
                folder.rmdir()


def _move_into(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    for pattern in OUTPUT_FILES:
        for old in out_dir.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    for new in staging.iterdir():
        os.replace(new, out_dir / new.name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _load_builder(spec: str) -> Callable[[str], StepTarget]:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"--builder {spec!r}: expected module:function")
    return getattr(importlib.import_module(module), attr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m profilers.trace",
                                description="the child of run_trace: profile a builder's step")
    p.add_argument("--builder", required=True, help="module:function(config path) -> StepTarget")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--wait", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--active", type=int, default=3)
    args = p.parse_args(argv)
    target = _load_builder(args.builder)(args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    prof = profile_steps(target.step, device=target.device, out_dir=args.out, wait=args.wait,
                         warmup=args.warmup, active=args.active)
    write_outputs(args.out, label=target.label, device=target.device, events=prof.events())
    return 0


if __name__ == "__main__":
    sys.exit(main())
