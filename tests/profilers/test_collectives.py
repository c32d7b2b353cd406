"""Collective sweeps: the alpha-beta fit against known parameters, the bus-bandwidth
factors of nccl-tests, and a real 2-rank gloo sweep through the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autotune.cli import main
from profilers.collectives import COLLECTIVES, bus_factor, fit_alpha_beta, message_sizes
from profilers.store import ProfileStore


def test_fit_recovers_known_latency_and_bandwidth() -> None:
    sizes = np.array(message_sizes(4096, 2**26), dtype=float)
    alpha, beta = 35e-6, 1 / 2.5e9
    rng = np.random.default_rng(0)
    times = (alpha + beta * sizes) * rng.uniform(0.98, 1.02, size=sizes.size)
    fit = fit_alpha_beta(sizes, times)
    assert fit["alpha_s"] == pytest.approx(alpha, rel=0.05)
    assert fit["bandwidth_bytes_per_s"] == pytest.approx(2.5e9, rel=0.03)
    assert fit["mape"] < 0.02


def test_bus_factors_are_nccl_tests_conventions() -> None:
    assert bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    assert bus_factor("all_gather", 4) == pytest.approx(3 / 4)
    assert bus_factor("reduce_scatter", 2) == pytest.approx(1 / 2)
    assert bus_factor("broadcast", 8) == 1.0


def test_message_sizes_double_from_4k_to_the_cap() -> None:
    assert message_sizes(4096, 65536) == [4096, 8192, 16384, 32768, 65536]


def test_two_rank_gloo_sweep_writes_tables(tmp_path: Path, capsys) -> None:
    out = tmp_path / "profiles"
    code = main(["profile", "--families", "collective", "--nproc", "2", "--max-bytes", "64KiB",
                 "--out", str(out)])
    assert code == 0
    store = ProfileStore.existing(out)
    table = store.load("collective")
    assert set(table.collective) == set(COLLECTIVES) and not table.key.duplicated().any()
    assert sorted(set(table.bytes)) == [4096, 8192, 16384, 32768, 65536]
    assert (table.median_s > 0).all() and (table.samples >= 5).all()
    assert table.schema_version.unique().tolist() == [1]
    fit = pd.read_parquet(out / "collective_fit.parquet")
    assert set(fit.collective) == set(COLLECTIVES)
    assert (fit.bandwidth_bytes_per_s > 0).all() and fit.mape.notna().all()
    # Profiling again adds nothing the store already holds.
    assert main(["profile", "--families", "collective", "--nproc", "2", "--max-bytes", "8KiB",
                 "--out", str(out)]) == 0
    assert len(store.load("collective")) == len(table)


@pytest.mark.parametrize("argv, expected", [
    (["profile", "--families", "gemm2"], "unknown family 'gemm2'"),
    (["profile", "--families", "collective", "--nproc", "1"], "collectives need at least 2 ranks"),
    (["profile", "--max-bytes", "lots"], "expected a size such as"),
    (["profile", "--min-bytes", "1MiB", "--max-bytes", "4KiB"], "is above --max-bytes"),
])
def test_profile_bad_input(argv: list[str], expected: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
