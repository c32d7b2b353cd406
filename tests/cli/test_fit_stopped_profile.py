"""`autotune fit` on a profile whose sweep stopped part-way (its --budget-s ran out): the sweep
copies the device's ceilings into the store only when it completes, so the fit measures
them when this machine is the one profiled, and otherwise refuses in one line, exit code 2."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from autotune import __version__
from autotune.cli import main
from cost_models.bundle import StepModels
from cost_models.features import Ceilings
from profilers.fingerprint import current_fingerprint
from profilers.store import ProfileStore

FLOPS, BYTES = 3e11, 4e10  # the fake measurements: what the fitted models must carry


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fake ceiling measurements, recording what was measured: the real ones take seconds and
    are checked in tests/profilers/test_ceilings*.py."""
    import profilers.ceilings

    calls: list[str] = []

    def matmul_ceiling(dtype: str, device_kind: str) -> SimpleNamespace:
        calls.append(f"matmul:{dtype}")
        return SimpleNamespace(flops_per_s=FLOPS, samples_s=[1e-3], method="fake")

    def copy_bandwidth(device_kind: str) -> SimpleNamespace:
        calls.append("copy")
        return SimpleNamespace(bytes_per_s=BYTES, samples_s=[1e-3], method="fake")

    monkeypatch.setattr(profilers.ceilings, "matmul_ceiling", matmul_ceiling)
    monkeypatch.setattr(profilers.ceilings, "copy_bandwidth", copy_bandwidth)
    return calls


def _stopped(root: Path, key: str, device_kind: str, gemm: ProfileStore | None) -> ProfileStore:
    """A store as a sweep stopped by its budget leaves it: op rows (gemm's, or none when it
    stopped before its first window), no ceiling table."""
    store = ProfileStore.open(root, key, {"device_kind": device_kind})
    if gemm is not None:
        store.append("gemm", gemm.load("gemm").drop(columns=["schema_version", "fingerprint"]))
    return store


def test_fit_measures_the_ceilings_a_stopped_profile_lacks(
        tmp_path: Path, capsys: pytest.CaptureFixture, gemm_store: ProfileStore,
        measured: list[str]) -> None:
    here = current_fingerprint("cpu", __version__).key()
    store = _stopped(tmp_path / "p", here, "cpu", gemm_store)
    out = tmp_path / "m"
    assert main(["fit", "--profiles", str(store.root), "--out", str(out)]) == 0
    assert measured[:2] == ["matmul:fp32", "copy"]  # then bf16 for the bundle, as before
    # Written into the store as the completed sweep would have, so a resumed sweep skips them.
    assert store.keys("ceiling") == {"matmul:fp32", "copy"}
    assert Ceilings.from_table(store.load("ceiling")) == Ceilings({"fp32": FLOPS}, BYTES)
    models = StepModels.load(out, here)
    assert models.ceilings.flops_per_s["fp32"] == FLOPS and models.ceilings.bytes_per_s == BYTES
    assert models.families["gemm"].kind == "learned"
    assert "matmul:fp32, copy" in capsys.readouterr().err


@pytest.mark.parametrize("device_kind", ["cpu", "cuda"])
def test_fit_refuses_a_stopped_profile_of_another_machine(
        tmp_path: Path, capsys: pytest.CaptureFixture, gemm_store: ProfileStore,
        measured: list[str], device_kind: str) -> None:
    store = _stopped(tmp_path / "p", "fp-elsewhere", device_kind, gemm_store)
    out = tmp_path / "m"
    assert main(["fit", "--profiles", str(store.root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "fp-elsewhere" in err[0] and f"autotune profile --out {store.root}" in err[0], err
    assert measured == [] and store.keys("ceiling") == set()  # this machine's figures: not its
    assert not out.exists()


def test_fit_refuses_a_profile_with_no_op_rows(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               measured: list[str]) -> None:
    here = current_fingerprint("cpu", __version__).key()
    store = _stopped(tmp_path / "p", here, "cpu", None)
    out = tmp_path / "m"
    assert main(["fit", "--profiles", str(store.root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "no completed op-family" in err[0] and f"autotune profile --out {store.root}" in err[0]
    assert measured == [] and not out.exists()
