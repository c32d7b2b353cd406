"""``autotune export`` and ``autotune import`` from the command line: what is written, and
bad input as one line, exit code 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from export_cases import CASES

from autotune.cli import main
from autotune.config import RunConfig, load_yaml


def _runconfig(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(CASES[case]))
    return path


def test_export_writes_the_config_and_its_substitutes(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    cfg = _runconfig(tmp_path, "chunkflow-dp2-tp2-zero2-selective")
    out = tmp_path / "out" / "ds.json"
    assert main(["export", str(cfg), "--format", "deepspeed", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    sidecar = out.with_name("ds.json.unmapped.txt")
    assert json.loads(out.read_text())["zero_optimization"]["stage"] == 2
    assert sidecar.read_text() in printed
    assert "schedule.policy=chunkflow: nearest: padded micro-batches" in sidecar.read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds.json", "ds.json.unmapped.txt"]


def test_export_to_stdout_keeps_substitutes_on_stderr(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    cfg = _runconfig(tmp_path, "padmax-cpu-one-rank")
    assert main(["export", str(cfg), "--format", "trl"]) == 0
    captured = capsys.readouterr()
    kwargs = yaml.safe_load(captured.out)
    assert kwargs["pad_to_multiple_of"] == kwargs["max_length"]
    assert captured.err.startswith(f"# {cfg} -> trl:")


def test_import_writes_a_valid_runconfig(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                              "zero_optimization": {"stage": 0}}))
    out = tmp_path / "imported.yaml"
    assert main(["import", "--from", "deepspeed", str(ds), "--out", str(out)]) == 0
    rc = load_yaml(RunConfig, out)
    assert (rc.schedule.policy, rc.schedule.micro_batch_size) == ("pad-batch", 4)
    assert rc.precision.dtype == "bf16"
    assert "global batch of 4 sequences" in capsys.readouterr().out


def _bad(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], expected: str) -> None:
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, captured.err
    assert err[0].startswith("autotune: error: ") and expected in err[0], err[0]
    assert captured.out == ""
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("fmt, case, expected", [
    ("colossalai", "padmax-cpu-one-rank", "invalid choice: 'colossalai'"),
    ("trl", "sorted-dp2-pp2-zero1-gpipe", "trl cannot express this run: pp=2: TRL's trainer "
                                          "has no pipeline parallelism"),
    ("accelerate", "sorted-dp2-pp2-zero1-gpipe", "accelerate cannot express this run: pp=2"),
])
def test_export_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture, fmt: str, case: str,
                          expected: str) -> None:
    cfg = _runconfig(tmp_path, case)
    _bad(tmp_path, capsys, ["export", str(cfg), "--format", fmt, "--out",
                            str(tmp_path / "out" / "x")], expected)


@pytest.mark.parametrize("fmt, name, content, expected", [
    ("deepspeed", "ds.json", '{"train_batch_size": 8, "zero_optimisation": {}}',
     "zero_optimisation: unknown key"),
    ("deepspeed", "ds.json", '{"train_batch_size": 8,', "not valid JSON (line 1"),
    ("deepspeed", "ds.json", "[1, 2]", "expected a mapping of keys at the top level, got list"),
    ("accelerate", "acc.yaml", "distributed_type: FSDP\nnum_procs: 2\n", "num_procs: unknown key"),
    ("accelerate", "acc.yaml", "distributed_type: FSDP\n  num_processes: 2\n",
     "YAML syntax error at line 2"),
    ("accelerate", "acc.yaml", "distributed_type: FSDP\nfsdp_config: {fsdp_offload_params: true}\n",
     "offloading parameters has no RunConfig equivalent"),
])
def test_import_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture, fmt: str, name: str,
                          content: str, expected: str) -> None:
    (tmp_path / name).write_text(content)
    _bad(tmp_path, capsys, ["import", "--from", fmt, str(tmp_path / name), "--out",
                            str(tmp_path / "rc.yaml")], expected)
