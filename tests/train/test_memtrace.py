"""``autotune memory``: peak memory per rank traced under fake tensors.

- Parameters, gradients and AdamW state per rank at the traced peak against a hand count
  from the model's dimensions: a 2-layer model at world 2 (dp 2, ZeRO 3), fp32 and bf16,
  on both ranks (an odd vocabulary, so FSDP2's padding of dim 0 shows on rank 1).
- A pipeline stage's peak extended from three short runs against the trace of every
  micro-batch, on both stages of a 2-stage 1F1B pipeline.
- llama3-8b on 8 GPUs (ZeRO 3) at real size: its shards and optimizer state by hand, RSS.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autotune.cli import main
from autotune.config import RunConfig

MODEL = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 97}


def _config(tmp_path: Path, **over: dict) -> Path:
    cfg = {"workload": {"model": MODEL,
                        "data": {"preset": "longsft", "num_sequences": 400, "max_len": 256},
                        "hardware": {"device": "cpu", "devices_per_node": 2, "nodes": 1},
                        "budget": {"global_batch_tokens": 1024}},
           "schedule": {"policy": "pad-batch", "micro_batch_size": 2},
           "parallel": {"dp": 2, "zero_stage": 3}} | over
    path = tmp_path / "rc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _memory(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(["memory", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _shapes(dims: dict) -> list[tuple[int, ...]]:
    """Every parameter's shape, as the Llama decoder declares it (Linear: out x in)."""
    h, f, v = dims["hidden"], dims["ffn"], dims["vocab"]
    q = h
    kv = h // dims["heads"] * dims["kv_heads"]
    block = [(q, h), (kv, h), (kv, h), (h, q), (f, h), (h, f), (f, h), (h,), (h,)]
    return block * dims["layers"] + [(v, h), (h,), (v, h)]


def _rest(shape: tuple[int, ...]) -> int:
    return shape[1] if len(shape) > 1 else 1


@pytest.mark.parametrize(("dtype", "rank"), [("fp32", 0), ("bf16", 1)])
def test_parameters_gradients_and_adamw_state_per_rank_by_hand(
        tmp_path: Path, capsys: pytest.CaptureFixture, dtype: str, rank: int) -> None:
    got = _memory(capsys, str(_config(tmp_path, precision={"dtype": dtype})), "--rank", str(rank))
    # The traced unit follows a two-token pass, so every sharded gradient exists at the peak.
    assert "after a two-token pass" in got["traced"] and got["tracker"] == "FSDPMemTracker"
    dp = 2
    shapes = _shapes(MODEL)
    padded = [-(-s[0] // dp) for s in shapes]  # FSDP2 pads dim 0 to a multiple of dp
    local = [max(0, min(p, s[0] - rank * p)) for p, s in zip(padded, shapes)]
    # fp32 master weights and fp32 gradient reductions under bf16 too (MixedPrecisionPolicy);
    # each shard's storage keeps the padded rows, AdamW's moments the rank's own rows only,
    # plus fused AdamW's step count: one float32 scalar per parameter.
    sharded = 4 * sum(p * _rest(s) for p, s in zip(padded, shapes))
    moments = 4 * 2 * sum(n * _rest(s) for n, s in zip(local, shapes)) + 4 * len(shapes)
    b = got["breakdown"]
    assert b["parameters"] == sharded
    assert b["gradients"] == sharded
    assert b["optimizer_state"] == moments
    assert got["peak_bytes"] == sum(b.values())
    assert (got["world"], got["rank"], got["stage"]) == (2, rank, 0)
    # The 97-row embedding and head: 49 rows stored on each rank, 48 of them rank 1's own.
    assert (moments == 2 * sharded + 4 * len(shapes)) == (rank == 0)


def _pipeline_config(tmp_path: Path) -> Path:
    return _config(tmp_path, workload={
        "model": MODEL, "data": {"preset": "longsft", "num_sequences": 400, "max_len": 256},
        "hardware": {"device": "cuda", "devices_per_node": 2, "nodes": 1},
        "budget": {"global_batch_tokens": 1024}},
        schedule={"policy": "pack", "micro_batch_tokens": 64},
        parallel={"pp": 2, "pp_schedule": "1f1b"}, kernels={"attention": "varlen"},
        precision={"dtype": "bf16"})


def _trace_rank(config: Path, rank: int, *extra: str) -> dict:
    out = config.parent / f"rank{rank}{''.join(extra)}.json"
    proc = subprocess.run([sys.executable, "-m", "autotune.memtrace", str(config), "--rank",
                           str(rank), "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["result"]


@pytest.mark.parametrize("rank", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_pipeline_stage_extended_from_three_runs_matches_the_whole_trace(
        tmp_path: Path, rank: int) -> None:
    """Stage 0 grows by its gradient receive buffers and inputs per micro-batch, the last
    stage by its activation receive buffers and their gradients."""
    config = _pipeline_config(tmp_path)
    extended = _trace_rank(config, rank)
    whole = _trace_rank(config, rank, "--full-pipeline")
    assert "3, 4 and 5 heaviest of 17" in extended["traced"]
    assert "17 heaviest of 17" in whole["traced"]
    # An upper bound: the micro-batches added in the short runs have the most segments.
    assert whole["peak_bytes"] <= extended["peak_bytes"] <= whole["peak_bytes"] * 1.005
    for key in ("parameters", "gradients", "optimizer_state"):
        assert extended["breakdown"][key] == whole["breakdown"][key]


@pytest.mark.slow  # 24 s; python -m suites.memory_traces traces 28 real-size configs
def test_llama3_8b_on_8_gpus_at_real_size_by_hand(tmp_path: Path) -> None:
    cfg = {"workload": {"model": {"preset": "llama3-8b"},
                        "data": {"preset": "longsft", "num_sequences": 4096, "max_len": 32768},
                        "hardware": {"device": "cuda", "devices_per_node": 8, "nodes": 1,
                                     "device_name": "H100-SXM"},
                        "budget": {"global_batch_tokens": 1048576, "memory_cap_gb": 80}},
           "schedule": {"policy": "pack", "micro_batch_tokens": 16384},
           "parallel": {"dp": 8, "zero_stage": 3},
           "checkpointing": {"policy": "full"},
           "kernels": {"attention": "varlen"}, "precision": {"dtype": "bf16"}}
    path = tmp_path / "rc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # A process of its own (the command starts one per traced rank, too): fresh RSS figures.
    proc = subprocess.run([sys.executable, "-m", "autotune", "memory", str(path), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    d = RunConfig.model_validate(cfg).workload.model.resolve()
    dims = {"layers": d.layers, "hidden": d.hidden, "heads": d.heads, "kv_heads": d.kv_heads,
            "ffn": d.ffn, "vocab": d.vocab}
    shapes = _shapes(dims)
    # Every dim 0 of llama3-8b divides by 8: no padding, every rank alike.
    assert all(s[0] % 8 == 0 for s in shapes)
    numel = sum(s[0] // 8 * _rest(s) for s in shapes)
    assert numel * 8 == d.total_params()
    b = got["breakdown"]
    assert b["parameters"] == 4 * numel  # fp32 master shards: 1/8 of 8.03 B parameters
    assert b["optimizer_state"] == 4 * 2 * numel + 4 * len(shapes)
    assert got["tracker"] == "FSDPMemTracker" and got["world"] == 8
    assert got["rss_bytes"] < 4 * 2**30


def test_a_gpu_trial_traced_over_the_cap_is_recorded_out_of_memory_without_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`autotune run` on GPUs confirms each candidate with a trace before measuring it."""
    import autotune.memtrace as memtrace
    from profilers.records import Status

    cfg = yaml.safe_load(_config(tmp_path, workload={
        "model": MODEL, "data": {"preset": "longsft", "num_sequences": 400, "max_len": 256},
        "hardware": {"device": "cuda", "devices_per_node": 2, "nodes": 1},
        "budget": {"global_batch_tokens": 1024}},
        kernels={"attention": "varlen"}, precision={"dtype": "bf16"}).read_text())
    rc = RunConfig.model_validate(cfg)
    trace = memtrace.trace_memory(rc)  # real, once; the cap does not change what is traced
    traced = trace.rank.peak_bytes
    monkeypatch.setattr(memtrace, "trace_memory", lambda *a, **k: trace)
    assert 2**16 < traced < 2**30  # a 2-layer model: between the two caps below
    capped = {cap: rc.model_copy(update={"workload": rc.workload.model_copy(update={
        "budget": rc.workload.budget.model_copy(update={"memory_cap_gb": cap})})})
        for cap in (2**-14, 1.0)}
    assert memtrace.confirm_fits(capped[1.0]) is None
    got = memtrace.confirm_fits(capped[2**-14])
    assert got.status == Status.OOM and got.peak_mem_bytes == traced
    assert f"{traced / 2**20:,.2f} MiB per rank" in got.reason and "not run" in got.reason
    assert "over the memory cap of 0.06 MiB" in got.reason


def _fixed(tmp_path: Path, length: int) -> str:
    import numpy as np

    path = tmp_path / f"fixed-{length}.npy"
    np.save(path, np.full(8, length, dtype=np.int64))
    return str(path)


@pytest.mark.slow  # four traces, 40 s; suites.context_parallel measures the same on real ranks
def test_context_parallel_halves_the_longest_sequences_activations(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """cp=2 (every sequence sharded: each rank holds half of a 1,024-token sequence) against
    dp=2 (one rank holds it whole), traced; activations are the peak less that of 64-token
    sequences (parameters, gradients and AdamW state alike: both replicate, ZeRO 0)."""
    peaks = {}
    for name, parallel, schedule, length in (
            ("dp2", {"dp": 2}, {"micro_batch_tokens": 1024}, 1024),
            ("cp2", {"cp": 2}, {"micro_batch_tokens": 512, "cp_placement": "all"}, 1024),
            ("dp2-short", {"dp": 2}, {"micro_batch_tokens": 1024}, 64),
            ("cp2-short", {"cp": 2}, {"micro_batch_tokens": 512, "cp_placement": "all"}, 64)):
        cfg = _config(tmp_path, schedule={"policy": "pack", **schedule},
                      parallel={**parallel, "zero_stage": 0})
        data = yaml.safe_load(cfg.read_text())
        data["workload"]["data"] = {"path": _fixed(tmp_path, length)}
        data["workload"]["budget"]["global_batch_tokens"] = 2 * length
        cfg.write_text(yaml.safe_dump(data))
        peaks[name] = _memory(capsys, str(cfg))["peak_bytes"]
    dp, cp = peaks["dp2"] - peaks["dp2-short"], peaks["cp2"] - peaks["cp2-short"]
    assert 0 < cp <= 0.6 * dp, peaks
