"""Op-family sweeps: what a case measures, the analytic costs, isolation of a case that
crashes or hangs, and a sweep that resumes after being killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from autotune.cli import main
from profilers.families import _causal_pairs, analytic_cost
from profilers.ops import _build, case_key, pool_windows, run_case
from profilers.store import ProfileStore
from profilers.sweep import sweep

GEMM = {"family": "gemm", "op": "linear", "pass": "fwd", "dtype": "fp32", "m": 48, "k": 32, "n": 24}
TINY_MODEL = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 96}


def test_case_key_ignores_field_order_and_sees_every_value() -> None:
    assert case_key(GEMM) == case_key(dict(reversed(list(GEMM.items()))))
    assert case_key(GEMM) != case_key(GEMM | {"m": 49})


def test_causal_pairs_match_a_mask_count() -> None:
    for seqlens, prefix in [([5, 1, 7], 0), ([4], 6), ([3, 3], 2)]:
        count = 0
        for n in seqlens:
            # Query i of a segment sees the prefix and keys 0..i of its own segment.
            count += sum(prefix + i + 1 for i in range(n))
        assert _causal_pairs(seqlens, prefix) == count


def test_analytic_costs_by_hand() -> None:
    assert analytic_cost(GEMM) == (2.0 * 48 * 24 * 32, (48 * 32 + 32 * 24 + 48 * 24) * 4.0)
    assert analytic_cost(GEMM | {"pass": "bwd"})[0] == 4.0 * 48 * 24 * 32
    att = {"family": "attention", "op": "varlen", "pass": "fwd", "dtype": "bf16", "heads": 4,
           "kv_heads": 2, "head_dim": 8, "seqlens": [3, 2]}
    assert analytic_cost(att)[0] == 4.0 * (6 + 3) * 4 * 8


def test_backward_measures_the_real_gradients() -> None:
    """The timed backward computes dX = G W and dW = G^T X, nothing less: checked against the
    same operands drawn again from the case's seeded generator."""
    fwd, bwd = _build(GEMM, torch.device("cpu"))
    out = fwd()
    gx, gw = bwd()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 32, generator=gen)
    w = torch.randn(24, 32, generator=gen) * 32 ** -0.5
    torch.testing.assert_close(out, x @ w.T, rtol=1e-5, atol=1e-5)
    g = torch.randn(48, 24, generator=gen)
    torch.testing.assert_close(gx, g @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, g.T @ x, rtol=1e-5, atol=1e-5)


def test_a_case_row_holds_every_sample_and_their_median() -> None:
    row = run_case(GEMM | {"pass": "bwd"}, min_time_s=0.02)
    assert row["status"] == "COMPLETE" and row["key"] == case_key(GEMM | {"pass": "bwd"})
    assert len(row["samples_s"]) == row["n_samples"] >= 5
    ordered, n = sorted(row["samples_s"]), row["n_samples"]
    middle = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    assert row["median_s"] == pytest.approx(middle, rel=1e-12)
    assert 0.0 <= row["foreign_cpu"] and row["windows"] == 1


def test_an_impossible_case_is_a_recorded_failure() -> None:
    row = run_case(GEMM | {"dtype": "fp32", "family": "optimizer", "op": "adamw", "pass": "bwd",
                           "numel": 10, "tensors": 1})
    assert row["status"] == "CRASHED" and "no bwd pass" in row["error"]


def _cases(n: int) -> list[dict]:
    return [GEMM | {"m": 16 * (i + 1)} for i in range(n)]


@pytest.mark.parametrize("fault, status", [("crash", "CRASHED"), ("hang", "TIMEOUT")])
def test_a_case_that_kills_or_hangs_its_process_is_recorded_and_the_sweep_goes_on(
        fault: str, status: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = _cases(3)
    # The timeout a healthy case never reaches, from this machine's own speed: a healthy
    # case's child timed first (interpreter and torch start-up dominate, and a loaded
    # machine slows them several-fold), with a wide margin.
    start = time.monotonic()
    sweep(cases[:1], ProfileStore.open(tmp_path / "probe", "fp"), min_time_s=0.02, windows=1,
          attempts=1, progress=False)
    timeout = max(5.0, 4 * (time.monotonic() - start))
    monkeypatch.setenv("AUTOTUNE_PROFILE_FAULT", f"{fault}:{case_key(cases[1])}")
    store = ProfileStore.open(tmp_path / "store", "fp")
    report = sweep(cases, store, case_timeout_s=timeout, min_time_s=0.02, windows=2, attempts=1,
                   progress=False)
    # Round 0 meets the bad case once; round 1 leaves it out: 2 + 1 + 2 windows.
    assert report.measured == 5 and report.failed == {status: 1} and report.remaining == 0
    table = pool_windows(store.load("gemm")).set_index("key")
    assert table.loc[case_key(cases[1]), "status"] == status
    good = table.drop(case_key(cases[1]))
    assert (good.status == "COMPLETE").all() and (good.windows == 2).all()
    again = sweep(cases, store, min_time_s=0.02, windows=2, progress=False)  # failures are results
    assert again.measured == 0 and again.skipped == 4


def _profile_argv(out: Path, workload: Path, space: Path) -> list[str]:
    return [sys.executable, "-m", "autotune", "profile", "--families", "norm",
            "--workload", str(workload), "--space", str(space), "--out", str(out),
            "--min-time-s", "0.01", "--windows", "3", "--json"]


@pytest.mark.slow  # 26 s; a killed driver's resume is also checked in tests/faults
def test_a_killed_sweep_resumes_to_the_same_records(tmp_path: Path) -> None:
    workload, space = tmp_path / "w.yaml", tmp_path / "s.yaml"
    workload.write_text(yaml.safe_dump({"model": TINY_MODEL,
                                        "data": {"preset": "longsft", "num_sequences": 64,
                                                 "max_len": 256}}))
    space.write_text(yaml.safe_dump({"micro_batch_tokens": [64], "chunk_size": [64]}))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(_profile_argv(whole, workload, space), check=True, capture_output=True)

    proc = subprocess.Popen(_profile_argv(cut, workload, space), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((cut / "norm").glob("part-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "no part written before exit"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(ProfileStore.existing(cut).load("norm"))
    subprocess.run(_profile_argv(cut, workload, space), check=True, capture_output=True)

    a, b = ProfileStore.existing(whole).load("norm"), ProfileStore.existing(cut).load("norm")
    assert not b.key.duplicated().any()
    assert set(a.key) == set(b.key)  # every (case, window) record, none twice
    pooled = pool_windows(b)
    assert len(pooled) == a.case.nunique() and (pooled.windows == 3).all()
    total = len(ProfileStore.existing(whole).load("norm"))
    assert 0 < partial < total  # it really was cut part-way
    # Once complete, the store also holds this machine's roofline for the cost models.
    assert ProfileStore.existing(cut).keys("ceiling") == {"matmul:fp32", "copy"}


@pytest.mark.parametrize("argv, expected", [
    (["profile", "--families", "gemm,gemm2"], "unknown family 'gemm2'"),
    (["profile", "--budget-s", "0"], "--budget-s must be positive, got 0"),
])
def test_profile_bad_flags(argv: list[str], expected: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


def test_profile_bad_stores(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["profile", "--families", "gemm", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err

    old = tmp_path / "old"
    old.mkdir()
    (old / "store.json").write_text('{"schema_version": 0, "fingerprint_key": "k"}')
    assert main(["profile", "--families", "gemm", "--out", str(old)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "schema version 0, this autotune reads version 1" in err[0]


def test_profile_names_a_corrupt_part(tmp_path: Path, capsys, monkeypatch) -> None:
    from autotune import __version__
    from profilers.fingerprint import current_fingerprint

    fp = current_fingerprint("cpu", __version__)
    store = ProfileStore.open(tmp_path, fp.key())
    part = store.append("gemm", __import__("pandas").DataFrame({"key": ["x"], "family": ["gemm"]}))
    part.write_bytes(b"PAR1 not really")
    assert main(["profile", "--families", "gemm", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and part.name in err[0] and "delete it" in err[0]
