"""Bad input: one line naming the problem, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autotune.cli import main

GOOD = {
    "workload": {
        "model": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "ffn": 64, "vocab": 64,
                  "max_seq_len": 256},
        "data": {"preset": "longsft", "num_sequences": 64, "max_len": 128, "seed": 0},
        "hardware": {"device": "cpu", "devices_per_node": 1, "nodes": 1},
        "budget": {"global_batch_tokens": 512, "memory_cap_gb": 4},
    },
    "schedule": {"policy": "chunkflow", "chunk_size": 64, "chunkflow_k": 1,
                 "micro_batch_tokens": 64, "micro_batch_size": 4},
}


def _cfg(tmp_path: Path, edit=None, data_file: tuple[str, bytes] | None = None) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(GOOD))
    if data_file is not None:
        name, content = data_file
        (tmp_path / name).write_bytes(content)
        cfg["workload"]["data"] = {"path": name}
    if edit:
        edit(cfg)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _set(path: str, value):
    def edit(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


CASES = {
    "unknown key": (dict(edit=_set("schedule.chunk_sise", 3)), "schedule.chunk_sise: unknown key"),
    "wrong type": (dict(edit=_set("schedule.micro_batch_tokens", "lots")),
                   "schedule.micro_batch_tokens: Input should be a valid integer"),
    "negative size": (dict(edit=_set("workload.budget.global_batch_tokens", -1)),
                      "global_batch_tokens: Input should be greater than 0 (got -1)"),
    "zero size": (dict(edit=_set("schedule.chunk_size", 0)),
                  "schedule.chunk_size: Input should be greater than 0 (got 0)"),
    "chunk above micro-batch": (dict(edit=_set("schedule.chunk_size", 128)),
                                "chunkflow needs chunk_size <= micro_batch_tokens"),
    "unknown model preset": (dict(edit=_set("workload.model", {"preset": "gpt-5"})),
                             "unknown model preset 'gpt-5'"),
    "unknown data preset": (dict(edit=_set("workload.data.preset", "wiki")),
                            "unknown data preset 'wiki'"),
    "missing data file": (dict(edit=_set("workload.data", {"path": "nope.jsonl"})),
                          "data file not found"),
    "empty data": (dict(data_file=("d.jsonl", b"\n")), "empty data"),
    "too long for context": (dict(data_file=("d.jsonl", b'{"length": 300}\n')),
                             "exceeds the model's context limit max_seq_len=256"),
    "non-utf8 line": (dict(data_file=("d.jsonl", b'{"length": 3}\n{"length": \xff}\n')),
                      "line 2: not UTF-8 text"),
    "malformed line": (dict(data_file=("d.jsonl", b'{"length": 3}\n{"length": 3}\n{oops\n')),
                       "line 3: malformed JSON"),
    "degrees vs devices": (dict(edit=_set("parallel", {"dp": 2, "tp": 1})),
                           "dp*tp*pp*cp = 2*1*1*1 = 2 does not match the 1 devices"),
    "tp vs kv heads": (dict(edit=lambda c: (c["workload"]["hardware"].update(devices_per_node=2),
                                           c.update(parallel={"tp": 2}))),
                       "tp=2 does not divide heads=2 and kv_heads=1"),
    "pp above layers": (dict(edit=lambda c: (c["workload"]["hardware"].update(devices_per_node=2),
                                            c.update(parallel={"pp": 2}))),
                        "pp=2 is more than layers=1"),
    "pipeline with chunkflow": (
        dict(edit=lambda c: (c["workload"]["model"].update(layers=2),
                             c["workload"]["hardware"].update(devices_per_node=2),
                             c.update(parallel={"pp": 2}))),
        "pipeline schedule 1f1b cannot run chunkflow"),
    "zero3 with chunkflow": (
        dict(edit=lambda c: (c["workload"]["hardware"].update(devices_per_node=2),
                             c.update(parallel={"dp": 2, "zero_stage": 3}))),
        "zero_stage=3 with dp > 1 cannot run chunkflow"),
    "too many ranks for the host": (
        dict(edit=lambda c: (c["workload"]["hardware"].update(devices_per_node=64),
                             c.update(parallel={"dp": 64}))),
        "64 CPU ranks on"),
    "yaml syntax": (dict(edit=None), None),  # replaced below with a broken file
}


@pytest.mark.parametrize("command", ["measure", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_runconfig(tmp_path: Path, capsys: pytest.CaptureFixture, case: str,
                       command: str) -> None:
    kwargs, expected = CASES[case]
    path = _cfg(tmp_path, **kwargs)
    if case == "yaml syntax":
        path.write_text("schedule:\n  policy: pack\n   chunk_size: 3\n")
        expected = "YAML syntax error at line 3"
    out_dir = tmp_path / "out"
    argv = [command, str(path), "--steps", "1"]
    if command == "measure":
        argv += ["--out", str(out_dir), "--json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, captured.err
    assert err[0].startswith("autotune: error: ") and expected in err[0], err[0]
    assert captured.out == ""
    assert not out_dir.exists()


@pytest.mark.parametrize("argv, expected", [
    (["measure", "missing.yaml"], "missing.yaml: file not found"),
    (["measure", "{cfg}", "--steps", "0"], "expected a positive integer, got 0"),
    (["measure", "{cfg}", "--steps", "many"], "expected a positive integer, got 'many'"),
    (["measure", "{cfg}", "--timeout", "-3"], "expected a positive number, got -3.0"),
    (["train", "{cfg}", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["run", "--workload", "nowhere"], "--workload 'nowhere' is neither a file nor a preset"),
    (["run", "--budget-trials", "0"], "expected a positive integer, got 0"),
    (["run", "--out", "{tmp}/bad name!"], "must be 1-128 letters, digits"),
    (["run", "--nproc", "99"], "99 CPU ranks on"),
    (["measure", "{cfg}", "--nproc", "2"], "2 processes x 1 nodes = 2 ranks, but dp*tp*pp*cp = 1"),
    (["train", "{cfg}", "--nnodes", "2", "--nproc", "1"], "--nnodes > 1 needs --rdzv-endpoint"),
    (["train", "{cfg}", "--resume", "{tmp}/nowhere"], "nowhere: no such checkpoint folder"),
    (["train", "{cfg}", "--keep", "0"], "expected a positive integer, got 0"),
])
def test_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                   expected: str) -> None:
    cfg = _cfg(tmp_path)
    argv = [a.format(cfg=cfg, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "bad name!").exists()


def test_real_entry_point_prints_no_traceback(tmp_path: Path) -> None:
    path = _cfg(tmp_path, edit=_set("schedule.policy", "zigzag"))
    proc = subprocess.run([sys.executable, "-m", "autotune", "measure", str(path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "schedule.policy: Input should be" in proc.stderr
