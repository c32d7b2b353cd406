"""``autotune memory`` refuses bad input: one line naming the problem, exit code 2, no
traceback, nothing on stdout. The config cases below validate; they fail later, where the
tracer or the model itself refuses them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autotune.cli import main

BASE = {
    "workload": {"model": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 4, "ffn": 128,
                           "vocab": 96},
                 "data": {"preset": "longsft", "num_sequences": 200, "max_len": 256},
                 "hardware": {"device": "cpu", "devices_per_node": 4, "nodes": 1},
                 "budget": {"global_batch_tokens": 1024}},
    "schedule": {"policy": "pack", "micro_batch_tokens": 256},
    "parallel": {"dp": 4},
}


def _write(tmp_path: Path, edit: dict) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in edit.items():
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "rc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autotune", "memory", *argv],
                          capture_output=True, text=True, timeout=300)


def _refused(code: int, stdout: str, stderr: str, words: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("autotune: error: "), stderr
    assert words in lines[0]
    assert "Traceback" not in stderr and stdout == ""


# Refused inside the traced rank's own process: the whole command runs, as users run it.
IN_THE_RANK = {
    # built: the kernel tuning cache the config names does not exist
    "cannot be built": ({"kernels.tuning_cache": "/nonexistent/cache.json"},
                        "no tuning cache"),
    # tp=4 splits ffn=6 as 2+2+1+1 rows of w1 but w2's columns otherwise: the model's
    # first forward cannot multiply them, on real devices as here
    "layout the model rejects": ({"workload.model.ffn": 6, "parallel": {"tp": 4}},
                                 "the model rejects its layout (tp=4, dp=1)"),
}
# Refused before any process starts.
UP_FRONT = {
    "compiled blocks": ({"compile": "blocks"}, "compile=blocks cannot be traced"),
    "fused loss": ({"kernels.loss": "fused"}, "kernels.loss=fused cannot be traced"),
    "dp does not fit the devices": ({"parallel": {"dp": 3}}, "does not match the 4 devices"),
}


def test_a_config_the_rank_cannot_build_is_refused_in_one_line(tmp_path: Path) -> None:
    """The whole command, as users run it: no traceback from the rank's process either."""
    edit, words = IN_THE_RANK["cannot be built"]
    proc = _run(str(_write(tmp_path, edit)))
    _refused(proc.returncode, proc.stdout, proc.stderr, words)


def test_a_layout_the_model_rejects_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    edit, words = IN_THE_RANK["layout the model rejects"]
    code = main(["memory", str(_write(tmp_path, edit))])
    _refused(code, *capsys.readouterr(), words)


@pytest.mark.parametrize("case", list(UP_FRONT))
def test_a_config_that_cannot_be_traced_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    edit, words = UP_FRONT[case]
    code = main(["memory", str(_write(tmp_path, edit))])
    _refused(code, *capsys.readouterr(), words)


def test_a_missing_runconfig_or_rank_is_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    code = main(["memory", str(tmp_path / "nope.yaml")])
    _refused(code, *capsys.readouterr(), "file not found")
    code = main(["memory", str(_write(tmp_path, {})), "--rank", "4"])
    _refused(code, *capsys.readouterr(), "--rank 4: the config's world has 4 ranks (0-3)")
