"""Peak memory per rank of GPU configs, traced at real size, and the GPU memory model fitted
on the traces.

    python -m suites.memory_traces [--out results/memory] [--only SUBSTRING] [--retrace]
    python -m suites.memory_traces --fit-only   # refit on the committed traces

Traces: `autotune memory` (autotune.memtrace) on each config of CONFIGS (its heaviest
data-parallel replica; with pp > 1 every stage of it), llama3-8b and qwen2.5-7b on one node
of 8 H100s (one qwen config on a node of 4) and llama3-70b on 2 and 8 nodes, bf16,
FlashAttention varlen, 1M-token global batches of the long-SFT preset to 32K: ZeRO 0-3,
tp 1-8, pp 1-2, checkpointing none / selective / full, micro-batches of 4K-64K tokens,
pack, sorted, skrull, pad-batch and chunkflow, under FSDP2's mixed precision (dp > 1) and
autocast (dp = 1). Each config is traced in processes of its own; a config already in
traces.parquet is kept (--retrace traces it again).

Fit: the step model's memory features of each config (autotune.predict, the unit each
config's peak comes from) against its traced peak, by non-negative least squares on the
relative error (cost_models.step.MemoryModel.fit), with no constant term (traced live
bytes have no allocator overhead). Held out: each config predicted by the
coefficients fitted on the others (leave one out). The coefficients go to
cost_models/data/memory_gpu.json, which every GPU step model uses (autotune.predict).

These are traced figures of live tensor bytes, as `torch.cuda.max_memory_allocated` counts
them; the CUDA caching allocator's fragmentation comes on top (the search keeps a 10%
margin below the cap for it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autotune.config import RunConfig
from autotune.predict import StepPredictor
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from cost_models.step import GPU_MEMORY_FILE, MemoryModel
from profilers.progress import progress
from profilers.store import atomic_write_text
from suites._report import host_line, md_table

GIB = 2**30


def _workload(model: str, nodes: int, per_node: int = 8) -> dict[str, Any]:
    return {"model": {"preset": model},
            "data": {"preset": "longsft", "num_sequences": 4096, "max_len": 32768, "seed": 0},
            "hardware": {"device": "cuda", "devices_per_node": per_node, "nodes": nodes,
                         "device_name": "H100-SXM"},
            "budget": {"global_batch_tokens": 1048576, "memory_cap_gb": 80}}


def _config(model: str, nodes: int, policy: str, *, tokens: int = 16384, dp: int = 8,
            tp: int = 1, pp: int = 1, zero: int = 3, ckpt: str = "full", chunk: int = 8192,
            k: int = 1, mbs: int = 1, reduce: str = "auto", per_node: int = 8) -> dict[str, Any]:
    return {"workload": _workload(model, nodes, per_node),
            "schedule": {"policy": policy, "micro_batch_tokens": tokens, "chunk_size": chunk,
                         "chunkflow_k": k, "micro_batch_size": mbs},
            "parallel": {"dp": dp, "tp": tp, "pp": pp, "zero_stage": zero,
                         "grad_reduce": reduce},
            "checkpointing": {"policy": ckpt, "fraction": 0.5},
            "kernels": {"attention": "varlen"}, "precision": {"dtype": "bf16"}}


L8, Q7, L70 = "llama3-8b", "qwen2.5-7b", "llama3-70b"
CONFIGS: list[dict[str, Any]] = [
    # llama3-8b, one node of 8: ZeRO stages, micro-batch sizes, checkpointing
    _config(L8, 1, "pack", tokens=4096, ckpt="none"),
    _config(L8, 1, "pack", tokens=8192, ckpt="selective"),
    _config(L8, 1, "pack", tokens=16384),
    _config(L8, 1, "pack", tokens=32768),
    _config(L8, 1, "pack", tokens=65536),
    _config(L8, 1, "pack", tokens=16384, zero=2),
    _config(L8, 1, "pack", tokens=16384, zero=1, ckpt="selective"),
    _config(L8, 1, "pack", tokens=8192, zero=0),
    _config(L8, 1, "pack", tokens=16384, reduce="step"),
    # tensor parallelism inside the node
    _config(L8, 1, "pack", tokens=16384, dp=4, tp=2),
    _config(L8, 1, "pack", tokens=32768, dp=2, tp=4, ckpt="selective"),
    _config(L8, 1, "pack", tokens=32768, dp=1, tp=8, zero=0, ckpt="none"),
    _config(L8, 1, "pack", tokens=16384, dp=1, tp=8, zero=0),
    _config(Q7, 1, "pack", tokens=16384, dp=1, tp=4, zero=0, ckpt="selective", per_node=4),
    # other policies
    _config(L8, 1, "chunkflow", chunk=8192, zero=2),
    _config(L8, 1, "chunkflow", chunk=4096, k=2, zero=2, ckpt="none"),
    _config(L8, 1, "chunkflow", chunk=16384, dp=4, tp=2, zero=2, ckpt="selective"),
    _config(L8, 1, "sorted", tokens=16384),
    _config(L8, 1, "skrull", tokens=16384, ckpt="selective"),
    _config(L8, 1, "pad-batch", mbs=2),
    _config(Q7, 1, "pack", tokens=16384),
    _config(Q7, 1, "pack", tokens=32768, dp=4, tp=2, ckpt="selective"),
    # llama3-70b on 2 and 8 nodes
    _config(L70, 2, "pack", tokens=8192, dp=2, tp=8),
    _config(L70, 2, "pack", tokens=16384, dp=4, tp=4, ckpt="selective"),
    _config(L70, 8, "pack", tokens=16384, dp=64),
    _config(L70, 8, "pack", tokens=32768, dp=8, tp=8),
    _config(L70, 8, "pack", tokens=16384, dp=4, tp=8, pp=2),
    _config(L70, 8, "chunkflow", chunk=8192, dp=16, tp=4, zero=2),
]


def _key(rc: RunConfig) -> str:
    w = rc.workload
    return f"{w.model.preset}@{w.hardware.nodes}x{w.hardware.devices_per_node}:{rc.label()}"


def _traces(out: Path) -> pd.DataFrame:
    path = out / "traces.parquet"
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame({"key": []})


def _rows_of(table: pd.DataFrame, configs: list[dict[str, Any]]) -> pd.DataFrame:
    """The traced rows of ``configs``, in their order (those not traced yet left out)."""
    keys = [_key(RunConfig.model_validate(c)) for c in configs]
    have = set(table["key"])
    return table.set_index("key").loc[[k for k in keys if k in have]].reset_index()


def trace_all(configs: list[dict[str, Any]], out: Path, *, retrace: bool) -> pd.DataFrame:
    """Trace every config not yet in ``out/traces.parquet`` (with ``retrace``, these configs
    again; other rows are kept); the table is rewritten after each one, so an interrupted
    run keeps what it traced."""
    from autotune.memtrace import trace_memory

    path = out / "traces.parquet"
    rcs = [RunConfig.model_validate(c) for c in configs]
    table = _traces(out)
    if retrace:
        table = table[~table["key"].isin({_key(rc) for rc in rcs})]
    todo = [rc for rc in rcs if _key(rc) not in set(table["key"])]
    for rc in progress(todo, desc="tracing", unit="config"):
        t = trace_memory(rc)
        r = t.rank
        row = {"key": _key(rc), "model": rc.workload.model.preset, "world": t.world,
               "label": rc.label(), "config_json": rc.model_dump_json(),
               "peak_bytes": r.peak_bytes, "seconds": t.seconds, "rss_bytes": r.rss_bytes,
               "traced": r.traced, "breakdown_json": json.dumps(r.breakdown),
               "stages_json": json.dumps([s.to_json_dict() for s in t.stages])}
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        table.to_parquet(tmp, index=False)
        tmp.replace(path)
    return _rows_of(table, configs)


def _traced_peak(row: pd.Series) -> int:
    """The config's peak: its worst rank among those traced (every stage's first rank)."""
    stages = json.loads(row["stages_json"])
    return max([int(row["peak_bytes"])] + [int(st["peak_bytes"]) for st in stages])


def fit(table: pd.DataFrame) -> tuple[MemoryModel, pd.DataFrame]:
    """The memory model fitted on every traced config, and per config its traced peak, the
    fitted model's prediction and the prediction of the model fitted on the others."""
    rcs = [RunConfig.model_validate_json(c) for c in table["config_json"]]
    # The memory features do not depend on the GPU's speed, so no ceilings are needed.
    predictor = StepPredictor(StepModels("traced:gpu", "cuda", Ceilings(
        {"bf16": 1e15, "fp32": 5e14}, 3e12, source="unused: memory only")))
    _, units = predictor.compose(rcs)
    frame = StepPredictor.unit_frame(units)
    traced = pd.Series([_traced_peak(r) for _, r in table.iterrows()], dtype=float)
    model = MemoryModel.fit(frame, traced, "traced:gpu", overhead=False, kind="traced")
    held = []
    for i in progress(range(len(table)), desc="leave one out"):
        rest = frame[frame["config"] != i]
        others = MemoryModel.fit(rest, traced.drop(i), "traced:gpu", overhead=False)
        held.append(float(others.peak(frame[frame["config"] == i]).iloc[0]))
    prior = MemoryModel("prior").peak(frame)
    out = pd.DataFrame({
        "config": table["key"], "world": table["world"], "traced_gib": traced / GIB,
        "prior_gib": prior.to_numpy() / GIB, "fitted_gib": model.peak(frame).to_numpy() / GIB,
        "held_out_gib": np.array(held) / GIB, "trace_s": table["seconds"],
        "rss_gb": table["rss_bytes"] / 1e9})
    for col in ("prior", "fitted", "held_out"):
        out[f"{col}_err"] = out[f"{col}_gib"] / out["traced_gib"] - 1
    return model, out


def _table(header: list[str], rows: list[list[Any]]) -> str:
    return md_table(pd.DataFrame(rows, columns=header).set_index(header[0]))


def _pct(x: pd.Series) -> str:
    a = x.abs()
    return f"median {a.median():.1%}, max {a.max():.1%}"


def write_report(model: MemoryModel, table: pd.DataFrame, errors: pd.DataFrame, out: Path) -> None:
    rows = []
    for (_, e), (_, t) in zip(errors.iterrows(), table.iterrows()):
        b = json.loads(t["breakdown_json"])
        top = sorted(b, key=b.get, reverse=True)[:2]
        rows.append([e["config"], e["world"], f"{e['traced_gib']:.1f}", f"{e['fitted_gib']:.1f}",
                     f"{e['fitted_err']:+.1%}", f"{e['held_out_gib']:.1f}",
                     f"{e['held_out_err']:+.1%}", f"{e['prior_err']:+.1%}",
                     ", ".join(f"{k} {b[k] / GIB:.1f}" for k in top),
                     f"{e['trace_s']:.0f}", f"{e['rss_gb']:.2f}"])
    coef = [[k, f"{v:.3f}"] for k, v in model.coef.items()]
    coef.append(["overhead (GiB)", f"{model.overhead_bytes / GIB:.2f}"])
    text = "\n".join([
        "# Peak memory per rank at GPU scale: traced, and the step model fitted on the traces",
        "",
        f"`python -m suites.memory_traces` on {host_line()} (no GPU): every figure is a peak "
        "traced under fake tensors by `autotune memory` (live tensor bytes, as "
        "`torch.cuda.max_memory_allocated` counts them; the caching allocator's fragmentation "
        "comes on top) or a prediction of the step model. Workloads: long-SFT to 32K, 1M-token "
        "global batches, bf16, FlashAttention varlen, H100-SXM nodes of 8 (the device only "
        "sets the memory cap; traced bytes do not depend on it). The config's peak is its "
        "worst traced rank (with pp > 1, each stage's first rank).",
        "",
        f"- Fitted (in sample): {_pct(errors['fitted_err'])} from the traced peak.",
        f"- Held out (each config predicted by the model fitted on the other "
        f"{len(errors) - 1}): {_pct(errors['held_out_err'])}.",
        f"- The analytic count alone (every coefficient 1): {_pct(errors['prior_err'])}.",
        f"- Tracing: {errors['trace_s'].median():.0f} s median, {errors['trace_s'].max():.0f} s "
        f"at most; RSS {errors['rss_gb'].max():.2f} GB at most per traced rank.",
        "",
        _table(["config", "world", "traced GiB", "fitted GiB", "fitted err", "held-out GiB", "held-out err",
                "prior err", "largest parts (GiB)", "trace s", "RSS GB"], rows),
        "",
        "## Coefficients (cost_models/data/memory_gpu.json)",
        "",
        "Each multiplies an analytic count of `autotune.step_memory` (`gpu_memory_units`): state "
        "(fp32 parameters, gradients and AdamW moments this rank holds), gathered parameters "
        "(and gradients accumulated unsharded), activations of layers that keep them, "
        "checkpointed layers' inputs, one layer recomputed, score matrices (none under "
        "FlashAttention), ChunkFlow's key/value state, and the loss's logits.",
        "",
        _table(["feature", "coefficient"], coef),
        "",
    ])
    atomic_write_text(out / "README.md", text)
    errors.to_csv(out / "errors.csv", index=False, float_format="%.4f")


def save_model(model: MemoryModel, n: int, path: Path = GPU_MEMORY_FILE) -> None:
    meta = {"source": "python -m suites.memory_traces (results/memory/traces.parquet)",
            "n_traces": n, "coef": model.coef, "overhead_bytes": model.overhead_bytes}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suites.memory_traces", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/memory"))
    p.add_argument("--only", default=None, help="trace only configs whose key contains this")
    p.add_argument("--retrace", action="store_true", help="trace configs already in the table")
    p.add_argument("--fit-only", action="store_true", help="refit on the committed traces")
    args = p.parse_args(argv)
    if args.only:
        trace_all([c for c in CONFIGS if args.only in _key(RunConfig.model_validate(c))],
                  args.out, retrace=args.retrace)
        return 0
    table = (_rows_of(_traces(args.out), CONFIGS) if args.fit_only
             else trace_all(CONFIGS, args.out, retrace=args.retrace))
    model, errors = fit(table)
    save_model(model, len(table))
    write_report(model, table, errors, args.out)
    print(f"fitted on {len(table)} traces: {_pct(errors['fitted_err'])}; held out: "
          f"{_pct(errors['held_out_err'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
