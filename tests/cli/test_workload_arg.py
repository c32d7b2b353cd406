"""`--workload` means the same to every command: a preset, a Workload YAML, or a RunConfig
YAML whose workload it is. One loader tells the two files apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autotune.cli import main
from autotune.cli._common import load_workload
from autotune.config import RunConfig, Workload, dump_yaml, load_yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chunkflow.yaml"


def test_a_runconfig_gives_its_workload_and_itself(tmp_path: Path) -> None:
    rc = load_yaml(RunConfig, EXAMPLE)
    wl, user = load_workload(str(EXAMPLE))
    assert wl == rc.workload and user == rc
    alone = tmp_path / "workload.yaml"
    alone.write_text(dump_yaml(rc.workload))
    assert load_workload(str(alone)) == (rc.workload, None)
    assert load_workload("tiny") == (Workload(), None)


def test_a_runconfig_without_a_workload_key_is_still_a_runconfig(tmp_path: Path) -> None:
    path = tmp_path / "rc.yaml"
    path.write_text(yaml.safe_dump({"schedule": {"policy": "pack", "micro_batch_tokens": 512}}))
    wl, user = load_workload(str(path))
    assert user is not None and user.schedule.micro_batch_tokens == 512 and wl == Workload()


@pytest.mark.parametrize("command", [["profile", "--families", "gemm"], ["kernels", "tune"],
                                     ["run", "--plan-only"]])
def test_a_workload_with_a_stray_key_is_refused_naming_it(
        command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    doc = yaml.safe_load(dump_yaml(Workload())) | {"seed": 3}
    path = tmp_path / "wl.yaml"
    path.write_text(yaml.safe_dump(doc))
    before = sorted(tmp_path.rglob("*"))
    assert main([*command, "--workload", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed: unknown key" in err[0], err
    assert sorted(tmp_path.rglob("*")) == before


def test_profile_takes_a_runconfigs_workload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cases `autotune profile` sweeps for a RunConfig are its workload's."""
    seen = []
    monkeypatch.setattr("autotune.profile_grid.op_cases",
                        lambda wl, space, families: seen.append(wl) or [])
    for arg in (str(EXAMPLE), _workload_file(tmp_path)):
        main(["profile", "--families", "gemm", "--workload", arg, "--out",
              str(tmp_path / f"p{len(seen)}"), "--budget-s", "1"])
    assert len(seen) == 2 and seen[0] == seen[1]


def _workload_file(tmp_path: Path) -> str:
    path = tmp_path / "only-workload.yaml"
    path.write_text(dump_yaml(load_yaml(RunConfig, EXAMPLE).workload))
    return str(path)
