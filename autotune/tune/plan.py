"""``autotune run --plan-only``: the space ranked from the models alone, every figure
predicted: plan.md with the best configs that fit, how they hold the longest sequence and
how the best one scales with the node count."""

from __future__ import annotations

import pandas as pd

from autotune.config import RunConfig, Workload
from autotune.predict import StepPredictor
from autotune.tune.rundir import RunDir
from autotune.tune.strategies import MEMORY_MARGIN, memory_limit

__all__ = ["PLAN_FILES", "plan"]

PLAN_FILES = frozenset({"plan.md", "tuned.yaml"})  # what a plan writes


def plan(rundir: RunDir, candidates: list[RunConfig], predicted, models, space,  # noqa: ANN001
         longest: int, *, warmup: int, steps: int) -> tuple[dict, str]:
    """Rank the space from the models alone and write plan.md: the best predicted configs
    that fit, how they hold the longest sequence, and how the best one scales with the
    node count. Nothing is measured. Returns the result and plan.md's text."""
    wl = candidates[0].workload
    predictor = StepPredictor(models, warmup=warmup, steps=steps)
    feasible = predicted.peak_mem_bytes <= memory_limit(wl)
    order = list(predicted[feasible].sort_values("tokens_per_s", ascending=False).index)
    top = [_plan_row(candidates[i], predicted.loc[i], predictor) for i in order[:10]]
    lines = ["# autotune plan (predicted, nothing measured)", "",
             f"{len(candidates)} candidates priced by the step model ({models.calibration}; "
             f"ceilings: {models.ceilings.source}), {int(feasible.sum())} predicted to fit "
             f"{wl.budget.memory_cap_gb:g} GB per device with a {MEMORY_MARGIN:.0%} margin. "
             f"Every figure below is a prediction.", "", *_plan_table(top)]
    held, counts = _longest_fits(candidates, predicted, feasible, longest)
    lines += ["", *held]
    scaling = _scaling(space, wl, candidates, predicted, order, predictor)
    if scaling:
        lines += ["", f"## Scaling: the best predicted config per node count "
                      f"({wl.hardware.devices_per_node} devices per node)", "",
                  *_plan_table(scaling, nodes=True)]
    rundir.write_text("plan.md", "\n".join(lines) + "\n")
    rundir.write_tuned(candidates[order[0]])
    result = {"run_dir": str(rundir.path), "predicted": True, "candidates": len(candidates),
              "feasible": int(feasible.sum()), "config": top[0]["config"],
              "predicted_tokens_per_s": top[0]["tokens_per_s"], "top": top, "scaling": scaling,
              "longest_sequence": counts}
    return result, "\n".join(lines)


def _longest_fits(candidates: list[RunConfig], predicted, feasible, longest: int  # noqa: ANN001
                  ) -> tuple[list[str], dict]:
    """How the configs that fit hold the longest sequence: in ChunkFlow's chunks, sharded
    over a context-parallel group, or whole on one device (and with what, if so)."""
    def way(rc: RunConfig) -> str:
        if rc.schedule.policy == "chunkflow":
            return "in chunks (chunkflow)"
        return "sharded (cp > 1)" if rc.parallel.cp > 1 else "whole on one device"

    kinds = pd.Series([way(rc) for rc in candidates], index=predicted.index)
    out = [f"## How the longest sequence ({longest:,} tokens) fits", "",
           "| held | candidates | predicted to fit | best predicted tokens/s |",
           "|---|---:|---:|---:|"]
    counts = {}
    for kind in ("in chunks (chunkflow)", "sharded (cp > 1)", "whole on one device"):
        mine = kinds == kind
        fit = predicted[mine & feasible]
        counts[kind] = {"candidates": int(mine.sum()), "fit": len(fit)}
        best = f"{fit.tokens_per_s.max():,.0f}" if len(fit) else "-"
        out.append(f"| {kind} | {int(mine.sum())} | {len(fit)} | {best} |")
    whole = [candidates[i] for i in predicted.index[feasible & (kinds == "whole on one device")]]
    if not whole:
        out += ["", "Every config predicted to fit holds it in chunks or sharded."]
    else:
        how = sorted({f"checkpointing {rc.checkpointing.policy}, loss {rc.kernels.loss}, "
                      f"tp {rc.parallel.tp}" for rc in whole})
        out += ["", f"{len(whole)} configs are predicted to fit with it whole on one device, "
                    f"all of them with: {'; '.join(how)}."]
    return out, counts


def _plan_row(rc: RunConfig, row, predictor) -> dict:  # noqa: ANN001
    use = predictor.utilization(rc, float(row.tokens_per_s))
    return {"config": rc.label(), "nodes": rc.workload.hardware.nodes, "world": use["world"],
            "tokens_per_s": float(row.tokens_per_s),
            "tokens_per_s_per_device": use["tokens_per_s_per_device"], "mfu": use["mfu"],
            "step_time_s": float(row.step_time_s), "peak_mem_bytes": float(row.peak_mem_bytes)}


def _plan_table(rows: list[dict], *, nodes: bool = False) -> list[str]:
    first = "nodes | devices" if nodes else "rank"
    out = [f"| {first} | config | tokens/s | tokens/s per device | MFU | step s | peak GiB |",
           "|---|" + ("---|" if nodes else "") + "---|---:|---:|---:|---:|---:|"]
    for r, row in enumerate(rows, 1):
        lead = f"{row['nodes']} | {row['world']}" if nodes else str(r)
        out.append(f"| {lead} | `{row['config']}` | {row['tokens_per_s']:,.0f} | "
                   f"{row['tokens_per_s_per_device']:,.0f} | {row['mfu']:.1%} | "
                   f"{row['step_time_s']:.3f} | {row['peak_mem_bytes'] / 2**30:.1f} |")
    return out


def _scaling(space, wl: Workload, candidates: list, predicted,  # noqa: ANN001
             order: list[int], predictor) -> list[dict]:  # noqa: ANN001
    """The best predicted config on 1, 2, 4, ... nodes up to the workload's: the knobs of
    the 50 best configs here, laid out again over each node count's devices and priced
    (the global batch stays the same, so tokens per device fall as nodes are added)."""
    counts = sorted({n for n in (1 << i for i in range(wl.hardware.nodes.bit_length()))
                     if n <= wl.hardware.nodes} | {wl.hardware.nodes})
    if len(counts) == 1:
        return []
    keep = {_knobs(candidates[i]) for i in order[:50]}
    cap = memory_limit(wl)
    rows = []
    for n in counts:
        if n == wl.hardware.nodes:
            best = order[0]
            rows.append(_plan_row(candidates[best], predicted.loc[best], predictor))
            continue
        wl_n = wl.model_copy(update={"hardware": wl.hardware.model_copy(update={"nodes": n})})
        cands = [rc for rc in space.grid(wl_n) if _knobs(rc) in keep]
        pred = predictor.predict_many(cands) if cands else None
        if pred is None or not (pred.peak_mem_bytes <= cap).any():
            continue
        best = pred[pred.peak_mem_bytes <= cap].tokens_per_s.idxmax()
        rows.append(_plan_row(cands[best], pred.loc[best], predictor))
    return rows


def _knobs(rc: RunConfig) -> str:
    """A config without its layout: what the scaling table carries across node counts."""
    return rc.model_copy(update={"workload": None, "parallel": None}).model_dump_json()
