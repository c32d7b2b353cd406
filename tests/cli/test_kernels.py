"""`autotune kernels tune` writes a tuning cache the trainer's chooser reads back; bad input
is one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from autotune.cli import main
from autotune.config import RunConfig
from kernels.cache import TuningCache
from kernels.registry import KERNELS
from kernels.tuned import KernelChooser

RC = {
    "workload": {"model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128,
                           "vocab": 96},
                 "data": {"preset": "longsft", "num_sequences": 64, "max_len": 512},
                 "budget": {"global_batch_tokens": 1024}},
    "schedule": {"policy": "pack", "micro_batch_tokens": 512},
    "kernels": {"norm": "fused"},
}


def test_tune_writes_a_cache_the_trainer_reads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc_path = tmp_path / "rc.yaml"
    rc_path.write_text(yaml.safe_dump(RC))
    cache = tmp_path / "kernels.json"
    assert main(["kernels", "tune", "--workload", str(rc_path), "--kernel", "rmsnorm",
                 "--cache", str(cache), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tuned = out["kernels"]["rmsnorm"]["tuned"]
    assert tuned and out["kernels"]["rmsnorm"]["measured_pairs"] >= len(tuned)
    rc = RunConfig.model_validate(RC | {"kernels": {"norm": "fused", "tuning_cache": str(cache)}})
    chooser = KernelChooser.for_run(rc.kernels, "fp32", "cpu")
    for t in tuned:  # the trainer gets each shape's measured best
        assert chooser.config("rmsnorm", t["shape"]) == t["config"]
        assert t["config"] in KERNELS["rmsnorm"].configs()
    data = json.loads(cache.read_text())
    assert all(e["source_hash"] for e in data["entries"].values())
    # run again: the same file is loaded and extended, not refused
    assert main(["kernels", "tune", "--workload", str(rc_path), "--kernel", "rmsnorm",
                 "--cache", str(cache)]) == 0


def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["kernels", "tune", "--kernel", "nope"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    foreign = tmp_path / "foreign.json"
    TuningCache(foreign, "another-device").save()
    assert main(["kernels", "tune", "--kernel", "rmsnorm", "--cache", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tuned on device another-device" in err


def test_fused_loss_picks_keep_the_memory_cut(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """At vocabulary 4096 and 512-token micro-batches only 256-token chunks cut the loss's
    workspace 4x (by hand: 3*512*4096*4 B against 256*4096*4 + (512*64 + 4096*64)*4 B, 4.7x;
    512 tokens give 2.6x), so every tuned shape of 257 tokens and more gets chunk 256."""
    rc = {**RC, "workload": {**RC["workload"], "model": {**RC["workload"]["model"], "vocab": 4096}},
          "kernels": {"loss": "fused"}}
    rc_path = tmp_path / "rc.yaml"
    rc_path.write_text(yaml.safe_dump(rc))
    assert main(["kernels", "tune", "--workload", str(rc_path), "--kernel", "linear_ce",
                 "--cache", str(tmp_path / "k.json"), "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)["kernels"]["linear_ce"]["tuned"]
    big = [t for t in tuned if t["shape"]["tokens"] >= 512]
    assert big and all(t["config"] == {"chunk_tokens": 256} for t in big)
    spec = KERNELS["linear_ce"]
    cfgs = spec.configs()
    for t in tuned:  # the whole space's admissible set, so a lone config cannot pass by default
        ok = spec.admissible(t["shape"], cfgs, min_memory_cut=4.0)
        assert ok[cfgs.index(t["config"])], t


def test_a_config_that_fails_is_recorded_and_never_picked(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel config that raises (Triton out of shared memory, an OOM) is a tuning result:
    the slowest of all to the tuner, listed, never cached; the tuning goes on."""
    spec = KERNELS["rmsnorm"]
    bad = spec.configs()[::2]

    def run(inputs, cfg):  # noqa: ANN001, ANN202
        if cfg in bad:
            raise RuntimeError("out of resources: shared memory, Required: 262144")
        return spec.run(inputs, cfg)

    monkeypatch.setitem(KERNELS, "rmsnorm", dataclasses.replace(spec, run=run))
    rc_path = tmp_path / "rc.yaml"
    rc_path.write_text(yaml.safe_dump(RC))
    cache = tmp_path / "kernels.json"
    assert main(["kernels", "tune", "--workload", str(rc_path), "--kernel", "rmsnorm",
                 "--cache", str(cache), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["kernels"]["rmsnorm"]
    assert out["failed"] and all(f["config"] in bad for f in out["failed"])
    assert all("out of resources" in f["error"] for f in out["failed"])
    assert out["tuned"] and not any(t["config"] in bad for t in out["tuned"])
    cached = json.loads(cache.read_text())["entries"].values()
    assert cached and not any(e["config"] in bad for e in cached)
