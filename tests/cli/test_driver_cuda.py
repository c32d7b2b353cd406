"""The `autotune` process never initialises CUDA on a GPU machine: a context of its own would
hold memory on GPU 0 for the whole run, so rank 0 would always have less than its peers.

The driver runs on a simulated machine with two H100s (tests/cli/fake_gpu_driver.py) in which
every call that would create a CUDA context in the driver is recorded and raises; the ranks it
starts are real processes of this CPU-only machine and crash, which `autotune measure`
records as a measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from autotune.config import RunConfig, SearchSpace, Workload, save_yaml
from autotune.predict import StepPredictor
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from profilers.records import Measurement, Status

DRIVER = Path(__file__).with_name("fake_gpu_driver.py")
H100 = "NVIDIA H100 80GB HBM3"
WORKLOAD = {
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96},
    "data": {"preset": "longsft", "num_sequences": 64, "max_len": 256, "seed": 0},
    "hardware": {"device": "cuda", "devices_per_node": 1},
    "budget": {"global_batch_tokens": 1024, "trials": 3},
}


@pytest.fixture
def gpu_machine(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment of the simulated machine, its ceilings stored as the child that
    measures them would store them, and the file the driver's CUDA calls are written to."""
    marker = tmp_path / "cuda-initialised-in-driver.txt"
    env = {**os.environ, "AUTOTUNE_CACHE_DIR": str(tmp_path / "cache"),
           "FAKE_GPU_MARKER": str(marker)}
    done = subprocess.run([sys.executable, str(DRIVER), "seed", str(tmp_path / "cache")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return env, marker


def _autotune(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), "autotune", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)


def _no_cuda_in_driver(marker: Path, done: subprocess.CompletedProcess) -> None:
    assert not marker.exists(), f"the driver initialised CUDA:\n{marker.read_text()}"
    assert "Traceback" not in done.stderr, done.stderr


def test_measure_never_initialises_cuda_in_the_driver(gpu_machine, tmp_path: Path) -> None:
    env, marker = gpu_machine
    rc = RunConfig.model_validate({
        "workload": WORKLOAD, "schedule": {"policy": "pack", "micro_batch_tokens": 256}})
    save_yaml(rc, tmp_path / "rc.yaml")
    done = _autotune(["measure", "rc.yaml", "--steps", "1", "--warmup", "0", "--timeout", "300",
                      "--json"], env, tmp_path)
    _no_cuda_in_driver(marker, done)
    # The rank has no GPU here and crashes: a recorded measurement, and exit 1 as for any
    # trial that did not complete, not a failure of the driver.
    assert done.returncode == 1, done.stderr
    m = json.loads(done.stdout)
    assert m["status"] == "CRASHED" and "cuda" in m["reason"].lower()  # the rank's own CUDA
    # The driver described the GPUs (through NVML) without touching them.
    fp = m["fingerprint"]
    assert (fp["device_kind"], fp["device_name"], fp["device_count"]) == ("cuda", H100, 2)
    assert fp["driver_version"] == "550.54.15"


def test_run_never_initialises_cuda_in_the_driver(gpu_machine, tmp_path: Path) -> None:
    env, marker = gpu_machine
    wl = Workload.model_validate(WORKLOAD)
    (tmp_path / "workload.yaml").write_text(yaml.safe_dump(WORKLOAD))
    # The table holds what the run will search: the built-in space for the workload's GPUs.
    rcs = list(SearchSpace.default_for(wl).grid(wl))
    comp, _ = StepPredictor(StepModels("fp", "cuda", Ceilings({"fp32": 4e14, "bf16": 7e14},
                                                              3e12))).compose(rcs)
    step = 3.0 * comp.compute_s.to_numpy() + 1e-3 * np.exp(comp.log_micro_batches.to_numpy())
    rows = [{"config_json": rc.model_dump_json(), "measurement_json": Measurement(
                status=Status.COMPLETE, tokens_per_s=tokens / s, step_time_s=s, step_times_s=[s] * 3,
                peak_mem_bytes=2**30, warmup_steps=1, timed_steps=3).model_dump_json()}
            for rc, s, tokens in zip(rcs, step, comp.tokens_per_step, strict=True)]
    pd.DataFrame(rows).to_parquet(tmp_path / "table.parquet")
    done = _autotune(["run", "--workload", "workload.yaml", "--replay", "table.parquet",
                      "--out", "run", "--json"], env, tmp_path)
    _no_cuda_in_driver(marker, done)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["measured_trials"] == 3 and out["tokens_per_s"] > 0
    # priced with the prior on the ceilings stored for this (simulated) machine
    models = json.loads((tmp_path / "run" / "models" / "models.json").read_text())
    assert models["device"] == "cuda"
    assert models["ceilings"]["flops_per_s"] == {"fp32": 4.0e14, "bf16": 7.0e14}
