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
import torch


@pytest.fixture
def one_thread():
    """At these sizes a second intra-op thread only spin-waits, costing CPU time for nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
