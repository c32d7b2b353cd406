"""The Triton kernels' tests under the interpreter: TRITON_INTERPRET is read when triton is
imported, so setting it inside this process is too late; those tests run again in a child
pytest with it set."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def run_interpreted() -> Callable[[str, str], None]:
    def run(test_file: str, keyword: str) -> None:
        pytest.importorskip("triton")
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
             "-k", keyword],
            cwd=Path(__file__).parents[2], env={**os.environ, "TRITON_INTERPRET": "1"},
            capture_output=True, text=True, timeout=600)
        assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
        # every selected test ran: none skipped for want of the interpreter
        assert " passed" in child.stdout and " skipped" not in child.stdout, child.stdout[-2000:]

    return run
