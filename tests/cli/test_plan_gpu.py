"""Planning a GPU job on this machine, which has no GPU: `autotune predict` and `autotune run
--plan-only` for `device: cuda` price from the datasheet of `hardware.device_name`, never
touch CUDA, and label every figure predicted; what cannot be planned is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from autotune.cli import main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="plans for GPUs that are absent")

WL = {"model": {"preset": "llama3-8b"},
      "data": {"preset": "longsft", "num_sequences": 1024, "max_len": 32768},
      "hardware": {"device": "cuda", "devices_per_node": 8, "nodes": 1, "device_name": "H100-SXM"},
      "budget": {"global_batch_tokens": 262144, "memory_cap_gb": 80}}
RC = {"workload": WL, "schedule": {"policy": "pack", "micro_batch_tokens": 16384},
      "parallel": {"dp": 8, "zero_stage": 3}, "checkpointing": {"policy": "full"},
      "kernels": {"attention": "varlen"}, "precision": {"dtype": "bf16"}}


def _write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_predict_prices_an_absent_gpu_from_its_datasheet(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert main(["predict", _write(tmp_path, "rc.yaml", RC), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predicted"] is True and out["world"] == 8
    assert out["tokens_per_s_per_device"] == pytest.approx(out["tokens_per_s"] / 8)
    assert "datasheet H100-SXM" in out["sources"]["ceilings"]
    # MFU by hand: model FLOPs per second over 8 x the datasheet's dense bf16 peak.
    from autotune.config import RunConfig
    from autotune.data import load_dataset

    rc = RunConfig.model_validate(RC)
    dims = rc.workload.model.resolve()
    s = load_dataset(rc.workload.data, dims).lengths.astype(float)
    per_token = 6 * dims.matmul_params() + 6 * dims.layers * dims.q_width * (s * s).sum() / s.sum()
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * per_token / (8 * 989.4e12), rel=1e-9)
    assert 0 < out["mfu"] < 1


def test_plan_only_ranks_a_gpu_space_without_the_gpus(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    wl = _write(tmp_path, "wl.yaml", WL)
    out_dir = tmp_path / "plan"
    assert main(["run", "--workload", wl, "--gpus", "8", "--plan-only", "--json",
                 "--out", str(out_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predicted"] is True and out["candidates"] >= out["feasible"] >= 50
    assert len(out["top"]) == 10
    rates = [row["tokens_per_s"] for row in out["top"]]
    assert rates == sorted(rates, reverse=True)
    assert all(row["peak_mem_bytes"] <= 80 * 2**30 * 0.9 for row in out["top"])
    assert out["top"][0]["config"] == out["config"]
    plan = (out_dir / "plan.md").read_text()
    assert "predicted" in plan and out["config"] in plan
    assert (out_dir / "tuned.yaml").is_file()
    # how the configs that fit hold the longest sequence: every candidate counted once
    held = out["longest_sequence"]
    assert sum(k["candidates"] for k in held.values()) == out["candidates"]
    assert sum(k["fit"] for k in held.values()) == out["feasible"]
    assert "## How the longest sequence" in plan


@pytest.mark.parametrize(("edit", "words"), [
    ({"device_name": "B300-imaginary"}, "'B300-imaginary' is not a GPU of the datasheet table"),
    ({"device_name": None}, "hardware.device_name is not given"),
])
def test_a_gpu_the_datasheet_cannot_price_is_one_line(tmp_path: Path, capsys, edit: dict,  # noqa: ANN001
                                                       words: str) -> None:
    rc = json.loads(json.dumps(RC))
    rc["workload"]["hardware"] |= edit
    assert main(["predict", _write(tmp_path, "rc.yaml", rc)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "H100-SXM" in err[0]


def test_a_workload_nothing_fits_names_the_smallest_peak_and_what_helps(
        tmp_path: Path, capsys) -> None:  # noqa: ANN001
    wl = json.loads(json.dumps(WL))
    wl["model"] = {"preset": "llama3-70b"}
    wl["hardware"] |= {"devices_per_node": 1}
    out_dir = tmp_path / "plan"
    assert main(["run", "--workload", _write(tmp_path, "wl.yaml", wl), "--plan-only",
                 "--out", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "smallest predicted peak" in err[0], err
    assert "more devices" in err[0] and "checkpointing" in err[0]
    assert not out_dir.exists()  # nothing written
