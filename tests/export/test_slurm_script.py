"""The sbatch script runs under stand-ins for Slurm's ``srun`` and ``scontrol``: srun records
its command line and runs it as the one node of the allocation, with real torchrun and the
real worker training one step on two CPU ranks."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from export_cases import CASES, facts_of
from torch.distributed.run import get_args_parser

from autotune.config import RunConfig
from autotune.export import export_runconfig

SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$STANDIN_RECORD"
[ "${STANDIN_EXEC:-1}" = 1 ] || exit 0
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done  # srun's own options
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
exec "$@"
"""
SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && printf '127.0.0.1\\nnode2\\n'
"""

TWO_CPU_RANKS = {
    "workload": {"model": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "ffn": 64,
                           "vocab": 64, "max_seq_len": 256},
                 "data": {"preset": "longsft", "num_sequences": 32, "max_len": 64},
                 "hardware": {"device": "cpu", "devices_per_node": 2, "nodes": 1},
                 "budget": {"global_batch_tokens": 128}},
    "schedule": {"policy": "pack", "micro_batch_tokens": 64},
    "parallel": {"dp": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(tmp_path: Path, data: dict) -> tuple[Path, Path]:
    cfg = tmp_path / "run config.yaml"  # a space: the path must survive quoting
    cfg.write_text(yaml.safe_dump(data))
    rc = RunConfig.model_validate(data)
    facts = facts_of(rc, runconfig_path=cfg)
    script = tmp_path / "train.sbatch"
    script.write_text(export_runconfig(rc, "slurm", facts).text)
    return cfg, script


def _run(tmp_path: Path, script: Path, nnodes: int, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    # What the job would see, and nothing a Slurm or torchrun around the tests set.
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith("SLURM_") and k not in ("STEPS", "MASTER_PORT")}
    full_env = {**inherited, "PATH": path, "SLURM_NNODES": str(nnodes),
                "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "4242",
                "SLURM_SUBMIT_DIR": str(tmp_path), "STANDIN_RECORD": str(tmp_path / "srun.argv"),
                **env}
    return subprocess.run(["bash", str(script)], env=full_env, capture_output=True, text=True,
                          timeout=300)


def _torchrun_args(tmp_path: Path) -> tuple[list[str], object]:
    argv = (tmp_path / "srun.argv").read_text().splitlines()
    start = argv.index("torchrun")
    return argv[:start], get_args_parser().parse_args(argv[start + 1:])


def test_script_is_valid_bash() -> None:
    rc = RunConfig.model_validate(CASES["skrull-two-nodes-adaptive"])
    text = export_runconfig(rc, "slurm", facts_of(rc)).text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_one_node_trains_through_torchrun(tmp_path: Path) -> None:
    cfg, script = _script(tmp_path, TWO_CPU_RANKS)
    port = _free_port()
    proc = _run(tmp_path, script, 1, STEPS="1", MASTER_PORT=str(port))
    assert proc.returncode == 0, proc.stderr[-3000:]
    srun, args = _torchrun_args(tmp_path)
    assert srun == ["--nodes=1", "--ntasks-per-node=1"]
    assert (args.nnodes, args.nproc_per_node) == ("1", "2")
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == (
        "c10d", f"127.0.0.1:{port}", "4242")
    assert args.module and args.training_script == "autotune.train.worker"
    out = tmp_path / "autotune-train-4242.json"
    assert args.training_script_args == [str(cfg), "--mode", "train", "--steps", "1",
                                         "--out", str(out)]
    summary = json.loads(out.read_text())
    assert (summary["ranks"], summary["steps"]) == (2, 1)


def test_every_node_gets_the_same_torchrun(tmp_path: Path) -> None:
    data = CASES["skrull-two-nodes-adaptive"]
    cfg, script = _script(tmp_path, data)
    assert "#SBATCH --nodes=2" in script.read_text()
    assert "#SBATCH --gpus-per-node=2" in script.read_text()
    proc = _run(tmp_path, script, 2, STANDIN_EXEC="0")
    assert proc.returncode == 0, proc.stderr
    srun, args = _torchrun_args(tmp_path)
    assert srun == ["--nodes=2", "--ntasks-per-node=1"]
    assert (args.nnodes, args.nproc_per_node, args.rdzv_endpoint) == ("2", "2", "127.0.0.1:29500")
    assert args.training_script_args[:5] == [str(cfg), "--mode", "train", "--steps", "20"]


def test_a_smaller_allocation_stops_before_launching(tmp_path: Path) -> None:
    _, script = _script(tmp_path, CASES["skrull-two-nodes-adaptive"])
    proc = _run(tmp_path, script, 1, STANDIN_EXEC="0")
    assert proc.returncode == 2
    assert "wants 2 node(s); the allocation has 1" in proc.stderr
    assert not (tmp_path / "srun.argv").exists()


@pytest.mark.parametrize("path", ["/jobs/run.yaml", "/jobs/a dir/it's.yaml"])
def test_runconfig_path_is_quoted(path: str) -> None:
    rc = RunConfig.model_validate(CASES["padmax-cpu-one-rank"])
    text = export_runconfig(rc, "slurm", facts_of(rc, runconfig_path=Path(path))).text
    line = next(x for x in text.splitlines() if x.startswith("RUNCONFIG="))
    assert shlex.split(line.removeprefix("RUNCONFIG=")) == [path]
