"""The canary: a fixed 256^3 matmul that tracks a shared CPU's drifting speed, so that windows
and steps measured at different times meet at the machine's reference speed. A GPU has none:
there the matmul times kernel-launch latency, not what profiled ops or training steps depend
on, so nothing measured on a GPU records a canary or is scaled by one."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import fake_nvml
import numpy as np
import pandas as pd
import pytest
import torch

from autotune.calibrate import load_measurements
from autotune.config import RunConfig
from autotune.train import worker
from autotune.train.distributed import ParallelContext
from autotune.train.trainer import StepResult
from cost_models.family import target_seconds
from profilers import ops, sweep
from profilers.ceilings import Ceiling
from profilers.fingerprint import current_fingerprint, threads_tag
from profilers.ops import canary_reference, canary_time, pool_windows, window_row
from profilers.records import Measurement
from profilers.store import ProfileStore
from profilers.telemetry import Telemetry
from profilers.timer import StepTimer

GEMM = {"family": "gemm", "op": "linear", "pass": "fwd", "dtype": "fp32", "m": 48, "k": 32, "n": 24}
CANARY_KEYS = {"canary_s", "canary_ref_s"}


def _no_canary(*args: object, **kwargs: object) -> float:
    raise AssertionError("a canary was timed on a GPU")


def test_the_canary_refuses_a_gpu(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CPUs only"):
        canary_time("cuda")
    with pytest.raises(ValueError, match="CPUs only"):
        canary_reference("cuda", "k", tmp_path)
    assert not (tmp_path / "canary.json").exists()


def test_canary_reference_is_kept_per_thread_count(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank running fewer threads runs the canary slower for that, not because the machine
    drifted: its reference is its own."""
    monkeypatch.setattr(ops, "canary_time",
                        lambda kind, min_time_s=0.0: 1e-3 * torch.get_num_threads())
    threads = torch.get_num_threads()
    assert canary_reference("cpu", "k", tmp_path) == 1e-3 * threads
    torch.set_num_threads(threads + 1)
    try:
        assert canary_reference("cpu", "k", tmp_path) == pytest.approx(1e-3 * (threads + 1))
    finally:
        torch.set_num_threads(threads)
    assert canary_reference("cpu", "k", tmp_path) == 1e-3 * threads  # stored, not re-timed
    assert set(json.loads((tmp_path / "canary.json").read_text())) == {
        "k" + threads_tag(threads), f"k@{threads + 1}threads"}


def test_gpu_window_times_no_canary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "canary_time", _no_canary)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(ops, "_build", lambda case, device: (lambda: None, lambda: None))
    monkeypatch.setattr(ops, "bench", lambda fn, kind, **kw: ([2e-3, 1e-3, 3e-3], 4))
    result = ops.measure_window(GEMM, "cuda")
    assert result["status"] == "COMPLETE" and "canary_s" not in result
    row = window_row(GEMM, 0, result)
    assert not CANARY_KEYS & set(row) and row["median_s"] == 2e-3


def _windows(canary: list[float] | None) -> pd.DataFrame:
    rows = []
    for w, samples in enumerate(([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])):
        result = {"status": "COMPLETE", "samples_s": samples, "inner": 1, "foreign_cpu": 0.0,
                  "attempts": 1}
        if canary is not None:
            result["canary_s"] = canary[w]
        rows.append(window_row(GEMM, w, result, 2.0 if canary is not None else None))
    return pd.DataFrame(rows)


def test_gpu_windows_are_pooled_as_measured() -> None:
    pooled = pool_windows(_windows(None))
    assert not {"median_at_reference_s", "canary_ratio"} & set(pooled.columns)
    assert pooled.median_s.iloc[0] == 3.5
    assert target_seconds(pooled)[0] == 3.5  # what the family model learns: the plain median


def test_cpu_windows_are_scaled_by_their_canary() -> None:
    pooled = pool_windows(_windows([1.0, 4.0])).iloc[0]
    # window 0 at 2/1 of its speed, window 1 at 2/4: 2, 4, 6, 2, 2.5, 3 -> median 2.75
    assert pooled.median_at_reference_s == 2.75 and pooled.median_s == 3.5
    assert pooled.canary_ratio == pytest.approx(1.25)


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_sweep_passes_a_reference_canary_on_cpu_only(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child_args: list[list[str]] = []

    def child(todo: list[dict], writer: object, bar: object, report: object, **kw: object):  # noqa: ANN202
        child_args.append(kw["child_args"])  # type: ignore[arg-type]
        return {sweep._job_key(j) for j in todo}, set()

    monkeypatch.setattr(sweep, "_run_child", child)
    monkeypatch.setattr(ops, "canary_reference",
                        (lambda kind, key, cache_dir=None: 0.5) if kind == "cpu" else _no_canary)
    sweep.sweep([GEMM], ProfileStore.open(tmp_path / "store", "fp"), device_kind=kind,
                windows=1, progress=False)
    args = child_args[0]
    if kind == "cpu":
        assert args[args.index("--canary-ref-s") + 1] == "0.5"
    else:
        assert "--canary-ref-s" not in args


class _Trainer:
    """The trainer, as measure_trial sees it: steps with known results."""

    def __init__(self, rc: RunConfig, ctx: ParallelContext) -> None:
        self.optimizer, self.params = SimpleNamespace(state={}), list[torch.nn.Parameter]()

    def step(self, batch_ids: np.ndarray | None = None) -> StepResult:
        return StepResult(step=1, loss=2.0, tokens=100, padded_tokens=128, micro_batches=2,
                          recomputed_tokens=0, max_seq_len=64, schedule_s=1e-3, model_flops=1e9,
                          batch_ids=np.arange(4), compute_s=1e-2, rank_flops=[1e9])


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_measured_step_records_a_canary_on_cpu_only(kind: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """measure_trial itself, with the trainer and the device calls faked (no GPU here)."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml.make())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 2**20)
    monkeypatch.setattr(worker, "Trainer", _Trainer)
    monkeypatch.setattr(worker, "StepTimer", lambda kind: StepTimer("cpu"))
    monkeypatch.setattr(worker, "_telemetry", lambda kind, ctx: Telemetry("cpu", interval_s=None))
    monkeypatch.setattr(worker, "matmul_ceiling", lambda dtype, kind: Ceiling(
        dtype=dtype, device_kind=kind, flops_per_s=1e12, size=64, samples_s=[1e-3], method="t",
        fingerprint_key="k"))
    if kind == "cpu":
        monkeypatch.setattr(worker, "canary_time", lambda kind: 3e-3)
        monkeypatch.setattr(worker, "canary_reference", lambda kind, key: 2e-3)
    else:
        monkeypatch.setattr(worker, "canary_time", _no_canary)
        monkeypatch.setattr(worker, "canary_reference", _no_canary)
    rc = RunConfig.model_validate({"workload": {"hardware": {"device": kind,
                                                             "device_name": "H100-SXM"}}})
    m = worker.measure_trial(rc, ParallelContext(device=torch.device("cpu")), steps=2, warmup=1,
                             fault=None)
    assert m is not None and m.status.value == "COMPLETE" and m.fingerprint is not None
    assert m.fingerprint == current_fingerprint(rc.workload.hardware.device,
                                                m.fingerprint.package_version)
    assert not CANARY_KEYS & set(m.extra)
    if kind == "cpu":
        assert (m.canary_s, m.canary_ref_s) == (3e-3, 2e-3)
        assert m.drift == pytest.approx(1.5)
    else:
        assert (m.canary_s, m.canary_ref_s) == (None, None)
        assert m.drift == 1.0
        assert float(m.extra["mfu_datasheet"]) > 0  # type: ignore[arg-type]  # the rest is there


def test_stored_steps_are_scaled_by_their_canary() -> None:
    """A measurement table written while the canary lived in ``extra`` loads at the
    reference speed: each step mean divided by its own canary ratio, read here off the raw
    JSON."""
    path = Path(__file__).parents[2] / "results" / "step_dataset_canary" / "repeat.parquet"
    raw = [json.loads(j) for j in pd.read_parquet(path).measurement_json]
    ratio = [m["extra"]["canary_s"] / m["extra"]["canary_ref_s"] for m in raw]
    as_measured = [float(np.mean(m["step_times_s"])) for m in raw]
    assert [Measurement.model_validate(m).drift for m in raw] == pytest.approx(ratio)
    scaled = load_measurements([path])
    assert scaled.drift.tolist() == pytest.approx(ratio)
    assert scaled.step_mean_s.tolist() == pytest.approx([s / r for s, r in zip(as_measured, ratio)])
    plain = load_measurements([path], scale_drift=False)
    assert plain.step_mean_s.tolist() == pytest.approx(as_measured)
    assert set(plain.drift) == {1.0}
