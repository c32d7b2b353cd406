"""Importing an export gives back every knob the format carries, and exporting that import
gives back the same file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from export_cases import facts_of, runconfig

from autotune.config import RunConfig
from autotune.errors import UserError
from autotune.export import export_runconfig
from autotune.export.importers import import_accelerate, import_deepspeed

DS_CASES = ("pack-dp4-zero3-full-bf16", "chunkflow-dp2-tp2-zero2-selective",
            "padmax-cpu-one-rank", "sorted-dp2-pp2-zero1-gpipe", "skrull-two-nodes-adaptive")
ACCELERATE_CASES = ("pack-dp4-zero3-full-bf16", "chunkflow-dp2-tp2-zero2-selective",
                    "padmax-cpu-one-rank", "skrull-two-nodes-adaptive")


def _export(rc: RunConfig, fmt: str, path: Path) -> str:
    text = export_runconfig(rc, fmt, facts_of(rc)).text
    path.write_text(text)
    return text


@pytest.mark.parametrize("case", DS_CASES)
def test_deepspeed_round_trip(tmp_path: Path, case: str) -> None:
    rc = runconfig(case)
    text = _export(rc, "deepspeed", tmp_path / "ds.json")
    back = import_deepspeed(tmp_path / "ds.json", rc.workload).runconfig
    layers = rc.workload.model.resolve().layers
    assert back.parallel.model_dump(exclude={"pp_schedule"}) == rc.parallel.model_dump(
        exclude={"pp_schedule"})
    assert back.precision == rc.precision
    assert back.optimizer == rc.optimizer
    assert (back.checkpointing.checkpointed_layers(layers)
            == rc.checkpointing.checkpointed_layers(layers))
    assert back.schedule.micro_batch_size == json.loads(text)["train_micro_batch_size_per_gpu"]
    assert back.schedule.policy == "pad-batch"
    assert export_runconfig(back, "deepspeed", facts_of(back)).text == text


@pytest.mark.parametrize("case", ACCELERATE_CASES)
def test_accelerate_round_trip(tmp_path: Path, case: str) -> None:
    rc = runconfig(case)
    text = _export(rc, "accelerate", tmp_path / "acc.yaml")
    back = import_accelerate(tmp_path / "acc.yaml", rc.workload).runconfig
    assert back.workload.hardware == rc.workload.hardware
    p, q = back.parallel, rc.parallel
    assert (p.dp, p.tp, p.pp, p.cp) == (q.dp, q.tp, q.pp, q.cp)
    if q.dp > 1:
        # FSDP2 runs stage 1 as 2 (as autotune does); under tp Accelerate shards even stage 0
        expected = {1: 2, 0: 0 if q.tp == 1 else 2}.get(q.zero_stage, q.zero_stage)
        assert p.zero_stage == expected
    assert back.precision == rc.precision
    assert (back.checkpointing.policy == "none") == (rc.checkpointing.policy == "none")
    assert export_runconfig(back, "accelerate", facts_of(back)).text == text


def test_accelerate_deepspeed_plugin_reads_its_config_file(tmp_path: Path) -> None:
    rc = runconfig("pack-dp4-zero3-full-bf16")
    _export(rc, "deepspeed", tmp_path / "ds.json")
    (tmp_path / "acc.yaml").write_text(yaml.safe_dump({
        "distributed_type": "DEEPSPEED", "num_processes": 4, "num_machines": 1,
        "mixed_precision": "bf16", "deepspeed_config": {"deepspeed_config_file": "ds.json"}}))
    back = import_accelerate(tmp_path / "acc.yaml", rc.workload).runconfig
    direct = import_deepspeed(tmp_path / "ds.json", rc.workload).runconfig
    assert back == direct


def test_deepspeed_batch_rule_is_deepspeeds(tmp_path: Path) -> None:
    """Two of the three batch sizes give the third; all three must agree; under AutoTP the
    rule counts tensor-parallel peers as ranks, though they share their sequences."""
    wl = runconfig("pack-dp4-zero3-full-bf16").workload  # 4 devices
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, "gradient_accumulation_steps": 2}))
    assert import_deepspeed(path, wl).runconfig.schedule.micro_batch_size == 4
    path.write_text(json.dumps({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2,
                                "gradient_accumulation_steps": 2}))
    with pytest.raises(UserError, match="32 is not train_micro_batch_size_per_gpu 2 x "
                                        "gradient_accumulation_steps 2 x 4 ranks"):
        import_deepspeed(path, wl)
    path.write_text(json.dumps({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2,
                                "tensor_parallel": {"autotp_size": 2}}))
    imported = import_deepspeed(path, wl)
    assert (imported.runconfig.parallel.dp, imported.runconfig.parallel.tp) == (2, 2)
    assert "global batch of 8 sequences" in "\n".join(imported.notes)


@pytest.mark.parametrize("cfg, message", [
    ({"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_optimizer":
                                                   {"device": "cpu"}}},
     "offloading to 'cpu' has no RunConfig equivalent"),
    ({"train_batch_size": "auto"}, "train_batch_size: is 'auto'"),
    ({"train_batch_size": 8, "zero_optimisation": {"stage": 2}}, "zero_optimisation: unknown key"),
    ({"train_batch_size": 8, "zero_optimization": {"stages": 2}},
     "zero_optimization.stages: unknown key"),
])
def test_deepspeed_import_refuses(tmp_path: Path, cfg: dict, message: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=message):
        import_deepspeed(path, runconfig("pack-dp4-zero3-full-bf16").workload)


def test_import_notes_what_it_substitutes(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True},
                                "optimizer": {"type": "Lamb", "params": {"lr": 0.01}},
                                "steps_per_print": 10}))
    imported = import_deepspeed(path, runconfig("pack-dp4-zero3-full-bf16").workload)
    assert imported.runconfig.precision.dtype == "bf16"
    assert imported.runconfig.optimizer.lr == 0.01
    notes = "\n".join(imported.notes)
    assert "fp16.enabled=true: nearest: precision.dtype=bf16" in notes
    assert "optimizer.type=Lamb: nearest: AdamW" in notes
    assert "steps_per_print: not carried" in notes
