"""A full or read-only output directory is one line and exit 1 (the work failed), with no
traceback and no half-written file. The directory is a tiny tmpfs mounted for the test
(root only; skipped, saying why, where mounting is not allowed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from autotune.cli import main

RC = {
    "workload": {"model": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "ffn": 64,
                           "vocab": 64},
                 "data": {"preset": "longsft", "num_sequences": 64, "max_len": 128},
                 "budget": {"global_batch_tokens": 512, "memory_cap_gb": 4}},
    "schedule": {"policy": "pack", "micro_batch_tokens": 128},
}


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_unwritable_output_is_one_line_and_exit_1(tmpfs, tmp_path: Path, fault: str,  # noqa: ANN001
                                                  capsys: pytest.CaptureFixture) -> None:
    small_fs = tmpfs(tmp_path / "mnt")
    rc = tmp_path / "rc.yaml"
    rc.write_text(yaml.safe_dump(RC))
    if fault == "full":
        (small_fs / "fill").write_bytes(b"\0" * 64 * 1024)
        expected = "No space left on device"
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
        expected = "Read-only file system"
    before = sorted(p.name for p in small_fs.rglob("*") if p.is_file())
    assert main(["measure", str(rc), "--steps", "1", "--out", str(small_fs / "m")]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("autotune: error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err
    assert sorted(p.name for p in small_fs.rglob("*") if p.is_file()) == before
