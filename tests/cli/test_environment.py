"""A foreign top-level ``kernels`` package is detected and named."""

import subprocess
import sys
from pathlib import Path


def test_foreign_kernels_package_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("# Hugging Face's kernels, say\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from autotune.cli import main; "
            "sys.exit(main(['run', '--help']))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert f"the 'kernels' package at {fake}" in proc.stderr
    assert "own virtual environment" in proc.stderr


def test_own_kernels_package_passes() -> None:
    from autotune.environment import check_kernels_package

    check_kernels_package()
