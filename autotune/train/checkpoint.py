"""Checkpoints of a training run, and the rules for resuming one under another layout.

A checkpoint is a folder ``step-NNNNNNNN`` under the run's save folder:

- the model and optimizer state through ``torch.distributed.checkpoint`` (DCP): each rank
  writes its own shards, and the state is keyed by parameter name (``get_state_dict``), not
  by layout, so DCP reshards it on load for any other data-, tensor- or ZeRO layout;
- each rank's RNG states (``rng-<rank>.pt``);
- ``autotune.json``, written last: the step, the RunConfig it ran, the layout, and the size of
  every file. A checkpoint is its folder renamed into place once all of that is on disk, so
  a run killed mid-save leaves a hidden ``.tmp-`` folder and the previous checkpoint intact.

The data position and the learning rate follow from the step alone: the global batches
are a seeded stream of the RunConfig (``step_plans(start=step)``) and the schedule is a
function of the step (``lr_factor``), so neither needs state of its own.

What may change on resume (EasyScale's point): everything that decides how a global batch
is computed (parallel degrees, ZeRO stage, scheduling policy, chunking, checkpointing,
kernels, compile, hardware), since every layout computes the same token-mean loss over the
same tokens. What may not: the model (the weights would not fit), and what decides which
tokens a step trains on or how the update is made (data, seed, global batch, optimizer,
precision), unless forced.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autotune import __version__
from autotune.config import RunConfig
from autotune.errors import UserError
from profilers.store import atomic_write_text

__all__ = ["Checkpoint", "FORMAT", "compare", "dirname", "find", "load", "prune", "save"]

FORMAT = "autotune-checkpoint/1"
META = "autotune.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# Fields that decide which tokens each step trains on and how the update is made: a resume
# that changes one cannot continue the same run.
RESULT_FIELDS = ("workload.data", "workload.budget.global_batch_tokens", "seed", "optimizer",
                 "precision.dtype")
# Optimizer flags that depend on the layout (fused kernels refuse mixed DTensor lists), kept
# from the optimizer being loaded into rather than taken from the checkpoint.
_IMPL_FLAGS = ("fused", "foreach", "capturable", "differentiable")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    runconfig: RunConfig
    layout: dict[str, Any]
    world: int


def dirname(step: int) -> str:
    return f"step-{step:08d}"


def _layout(rc: RunConfig) -> dict[str, Any]:
    p = rc.parallel
    return {"dp": p.dp, "tp": p.tp, "pp": p.pp, "cp": p.cp, "zero_stage": p.zero_stage,
            "policy": rc.schedule.policy, "device": rc.workload.hardware.device}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj


def _diff(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [(prefix, a, b)]


def compare(saved: RunConfig, now: RunConfig, *, where: Path, force: bool = False) -> list[str]:
    """Check that ``now`` may continue the run ``saved`` wrote, and say what it changes:
    one line per layout change. Raises UserError for another model always, and for a
    result-changing field unless ``force``."""
    a, b = saved.workload.model.resolve(), now.workload.model.resolve()
    model = _diff(a.model_dump(mode="json"), b.model_dump(mode="json"), "model")
    if model:
        field, old, new = model[0]
        raise UserError(f"{where}: the checkpoint holds another model ({field} {old} there, "
                        f"{new} in this RunConfig)")
    changed = [d for f in RESULT_FIELDS for d in _diff(_get(saved, f), _get(now, f), f)]
    if changed and not force:
        field, old, new = changed[0]
        raise UserError(f"{where}: written with {field}={old}, this RunConfig has {new}: the "
                        "steps after the resume would not continue the same run (--force to "
                        "resume anyway)")
    notes = [f"forced: {f} {old} -> {new}" for f, old, new in changed]
    layout = _diff(saved.model_dump(mode="json"), now.model_dump(mode="json"), "")
    skip = ("workload.model",) + RESULT_FIELDS
    notes += [f"{f[1:]} {old} -> {new}" for f, old, new in layout
              if not f[1:].startswith(skip)]
    return notes


def _read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / META
    if not meta_file.is_file():
        raise UserError(f"{path}: not an autotune checkpoint ({META} missing)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{meta_file}: corrupt checkpoint record ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_file}: not an autotune checkpoint of format {FORMAT}")
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise UserError(f"{path}: checkpoint file {name} is missing")
        if f.stat().st_size != size:
            raise UserError(f"{path}: checkpoint file {name} has {f.stat().st_size} bytes, "
                            f"{size} were written")
    return meta


def find(folder: Path) -> Checkpoint | None:
    """The checkpoint at ``folder`` (a ``step-`` folder) or the latest complete one under it
    (a save folder); None when a save folder holds none yet. Raises UserError for a folder
    that is missing or holds something else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such checkpoint folder")
    if not (folder / META).exists():
        steps = sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())
        if not steps:
            if any(folder.glob("*.distcp")) or (folder / ".metadata").exists():
                raise UserError(f"{folder}: not an autotune checkpoint ({META} missing)")
            return None
        folder = steps[-1]
    meta = _read_meta(folder)
    try:
        rc = RunConfig.model_validate(meta["runconfig"])
        return Checkpoint(folder, int(meta["step"]), rc, dict(meta["layout"]),
                          int(meta["world"]))
    except (KeyError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{folder / META}: corrupt checkpoint record ({first})") from None


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    # DCP warns that it assumes a single process when no group exists: that is the case.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _barrier(ctx: Any) -> None:
    if ctx.distributed:
        torch.distributed.barrier()


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save(trainer: Any, root: Path, *, fault: Any = None) -> Path:
    """Write ``trainer``'s state at its current step under ``root``; collective (every rank
    calls it). Returns the checkpoint's folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ctx, step = trainer.ctx, trainer.step_count
    root = Path(root)
    final = root / dirname(step)
    tmp = root / f".tmp-{dirname(step)}"
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        tmp.mkdir()
    _barrier(ctx)
    model_sd, optim_sd = get_state_dict(trainer.decoder, trainer.optimizer)
    with _single_process_ok():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(_rng_state(trainer.device), tmp / f"rng-{ctx.rank}.pt")
    if fault is not None:
        fault.maybe_fire(rank=ctx.rank, step=step, phase="save")
    _barrier(ctx)
    if ctx.rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"format": FORMAT, "autotune": __version__, "step": step, "world": ctx.world,
                "layout": _layout(trainer.rc), "runconfig": trainer.rc.model_dump(mode="json"),
                "files": files}
        atomic_write_text(tmp / META, json.dumps(meta, indent=2))
        if final.exists():  # the same step saved again (a resumed run's last step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    _barrier(ctx)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` latest checkpoints under ``root`` (rank 0 only)."""
    steps = sorted(p for p in Path(root).iterdir() if _STEP_DIR.match(p.name) and p.is_dir())
    gone = steps[:-keep] if keep > 0 else []
    for p in gone:
        shutil.rmtree(p)
    return gone


def load(trainer: Any, ckpt: Checkpoint) -> None:
    """Restore ``trainer`` to ``ckpt`` (collective): weights and optimizer state resharded
    to this trainer's layout, RNG states, and the step, which places the data stream and
    the learning-rate schedule."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(trainer.decoder, trainer.optimizer)
    flags = [{k: g[k] for k in _IMPL_FLAGS if k in g} for g in optim_sd["param_groups"]]
    state = {"model": model_sd, "optim": optim_sd}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=ckpt.path)
    # A BaseException: DCP gathers every rank's read error into one, raised on every rank.
    except (Exception, CheckpointException) as exc:
        failures = getattr(exc, "failures", None) or {trainer.ctx.rank: exc}
        rank, first = sorted(failures.items())[0]
        why = (str(first).splitlines() or [type(first).__name__])[0]
        raise UserError(f"{ckpt.path}: unreadable checkpoint data (rank {rank}: {why})"[:300]
                        ) from None
    for group, own in zip(state["optim"]["param_groups"], flags):
        group.update(own)
    set_state_dict(trainer.decoder, trainer.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    rank = trainer.ctx.rank if trainer.ctx.world == ckpt.world else 0
    try:
        rng = torch.load(ckpt.path / f"rng-{rank}.pt", weights_only=True)
    except Exception as exc:
        raise UserError(f"{ckpt.path}: unreadable RNG state ({type(exc).__name__})") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], trainer.device)
    trainer.seek(ckpt.step)
