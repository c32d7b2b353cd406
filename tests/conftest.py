"""Shared fixtures. GPU tests carry the ``gpu`` marker and are skipped without CUDA; ``slow``
tests run only under ``-m slow``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from profilers.store import ProfileStore


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Slow tests (minutes: whole benchmark suites) run only when asked for with -m slow, so
    # `make test` stays within its few minutes.
    if "slow" not in (config.getoption("markexpr") or ""):
        slow = pytest.mark.skip(reason="slow: run with -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(slow)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep measured ceilings and caches out of the user's home during tests."""
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path], Path]]:
    """Mounts a 64 KiB tmpfs where asked (a folder created for it), detached afterwards:
    a file system to fill up or remount read-only. Root only: skipped, saying why, elsewhere."""
    import subprocess

    made: list[Path] = []

    def mount(where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        made.append(where)
        return where

    yield mount
    for where in made:
        # Lazily: a process of a failed test may still hold a file there.
        subprocess.run(["umount", "--lazy", str(where)], check=False)


@pytest.fixture
def gemm_store(tmp_path: Path) -> ProfileStore:
    """A profile store (fingerprint "fp") of gemm cases that run below the roofline for small
    m, an effect the prior cannot know, and its ceiling table."""
    import numpy as np
    import pandas as pd

    from cost_models.features import Ceilings
    from cost_models.prior import roofline_time
    from profilers.families import analytic_cost
    from profilers.ops import case_key

    ceil = Ceilings({"fp32": 1e11}, 2e10)
    store = ProfileStore.open(tmp_path / "store", "fp")
    rng = np.random.default_rng(0)
    rows = []
    for m in range(16, 2048, 24):
        for k, n in ((192, 192), (192, 512), (512, 192)):
            case = {"family": "gemm", "op": "linear", "pass": "fwd", "dtype": "fp32",
                    "m": m, "k": k, "n": n}
            flops, nbytes = analytic_cost(case)
            true = roofline_time(pd.DataFrame([case | {"flops": flops, "bytes": nbytes}]), ceil)[0]
            true /= min(1.0, m / 512) * 0.8  # small m runs below peak: unknown to the prior
            for w in range(2):
                samples = list(true * rng.uniform(0.97, 1.03, 5))
                key = case_key(case)
                rows.append({"key": f"{key}/{w}", "case": key, "window": w, **case,
                             "flops": flops, "bytes": nbytes, "status": "COMPLETE", "error": "",
                             "median_s": float(np.median(samples)), "iqr_s": 0.0,
                             "min_s": min(samples), "n_samples": 5, "calls_per_sample": 1,
                             "foreign_cpu": 0.0, "attempts": 1, "canary_s": 1.0,
                             "canary_ref_s": 1.0, "samples_s": samples})
    store.append("gemm", pd.DataFrame(rows))
    store.append("ceiling", pd.DataFrame([
        {"key": "matmul:fp32", "family": "ceiling", "what": "matmul", "dtype": "fp32",
         "flops_per_s": 1e11, "bytes_per_s": None},
        {"key": "copy", "family": "ceiling", "what": "copy", "dtype": None,
         "flops_per_s": None, "bytes_per_s": 2e10}]))
    return store
